"""A training run's set-up: `prepare_run(cfg) -> Run`, everything the loop needs and nothing it does.

There are three ways to start, each a small constructor below:
- fresh: a new model, initialised from the seed, normalisation measured on the training list;
- fine-tune (`-load_pretrained W`): a new run whose model starts from W's weights (another class
  count re-initialises the last layer), normalisation taken from W when its input size matches;
- resume (`-resume CKPT`): the run CKPT saved, continued: its hyper-parameters, model, optimiser,
  schedule, random state and epoch.

Checks that can fail do so here, before the first batch: the targets of -save, -log and -plot, the
lists, the labels, every listed image's existence, the hyper-parameters.
"""
import os
import socket
from dataclasses import dataclass, field, replace

import numpy as np

from . import _random
from .checkpoint import load_checkpoint, load_into, load_weights
from .config import TrainConfig, flag_of, resolve, resumable_values
from .errors import CheckpointError, DataError, MinialexError, at_line
from .files import check_input_file, check_output_target, remove_stale_temps
from .progress import say


@dataclass
class Run:
    """A prepared run: the loop trains `model` from `start_epoch` to `cfg.epochs`."""
    cfg: TrainConfig
    model: object
    optimizer: object
    scheduler: object | None
    loss_fn: object
    train_loader: object
    val_loader: object | None
    arch: dict
    class_names: list
    normalization: dict
    lists: tuple                      # (training list, validation list or None) as used
    start_epoch: int = 1
    history: list = field(default_factory=list)
    best_val_top1: float | None = None
    fresh: bool = True                # a newly initialised model: its first loss should be ln(classes)
    world: object = None              # distributed.World: the processes training together
    reducer: object = None            # distributed.GradientReducer when there are several
    resumed_world_size: int | None = None

    @property
    def num_classes(self):
        return len(self.class_names)

    def checkpoint_meta(self):
        return {"arch": self.arch, "class_names": self.class_names, "normalization": self.normalization}

    def train_state(self, epoch, **extra):
        """What a checkpoint after `epoch` needs to resume the run exactly."""
        return {"epoch": epoch, "history": self.history, "best_val_top1": self.best_val_top1,
                "config": resumable_values(self.cfg), "rng": _random.get_generator().bit_generator.state,
                "lists": {"train": self.lists[0], "val": self.lists[1]}, "world_size": self.world.size,
                **extra}


def prepare_run(cfg: TrainConfig, world=None) -> Run:
    """Check the targets and options, read the data, build the model: the run `cfg` describes.

    In a data-parallel run every process prepares its own run through this same code; an error
    on any of them stops them all before the first collective, and then they agree on the start:
    the same list bytes (so the same normalisation, measured alike) and rank 0's weights.
    """
    from . import distributed
    world = world or distributed.world()
    run = world.collectively(_prepare_here, cfg, world)
    _join(run, world)
    if run.resumed_world_size not in (None, world.size):
        b = run.cfg.batch_size
        say(f"{run.cfg.resume} was trained by {run.resumed_world_size} processes, this run has "
            f"{world.size}: the global batch changes from {run.resumed_world_size * b} to {world.size * b}")
    return run


def _prepare_here(cfg, world):
    """The part of the set-up each process does alone (and where anything can fail)."""
    set_threads(cfg.threads, world)
    if cfg.resume:   # before -save, which defaults to it
        check_input_file(cfg.resume, "checkpoint", CheckpointError)
    cfg = replace(cfg, save=cfg.save if cfg.save is not None else (cfg.resume or "alexnet.npz"))
    if world.is_root:   # the one process that writes
        check_output_target(cfg.save, "-save")
        for name in ("log", "plot"):
            if getattr(cfg, name) is not None:
                check_output_target(getattr(cfg, name), flag_of(name))
        if cfg.plot:
            from .plot import require_matplotlib
            require_matplotlib()
    if cfg.precision == "bf16":
        check_bf16()
    if cfg.resume:
        run = _resumed(cfg, world)
    elif cfg.load_pretrained:
        run = _fine_tuned(cfg, world)
    else:
        run = _fresh(cfg, world)
    if world.is_root and remove_stale_temps(run.cfg.save):
        say(f"removed temporary files a killed save of {run.cfg.save} left behind")
    return run


def _join(run, world):
    """Make the processes of a data-parallel run start alike (no-op on one process)."""
    if not world.distributed:
        return
    from . import distributed
    for path, what in ((run.lists[0], "the training list"), (run.lists[1], "the validation list")):
        if path is not None:
            world.same_everywhere(distributed.file_digest(path), f"{what} {path} (bytes, SHA-256)")
    distributed.broadcast_parameters(run.model, world)
    if run.cfg.sync_bn:
        from .nn.normalization import convert_sync_batchnorm
        convert_sync_batchnorm(run.model, world.allreduce_)
    run.reducer = distributed.GradientReducer(world, grad_dtype=run.cfg.grad_dtype).attach(run.model)
    b = run.cfg.batch_size
    # Which process is which: a launcher that reports a dead process names its PID and host.
    where = world.allgather(f"{os.getpid()}@{socket.gethostname()}")
    say("ranks: " + ", ".join(f"{rank}=pid {w}" for rank, w in enumerate(where)))
    say(f"data-parallel: {world.size} processes ({world.local_size} on this node), "
        f"{numba_threads()} threads each, batch {b} per process, global batch {b * world.size}"
        f"{', batch norm over the global batch' if run.cfg.sync_bn else ''}"
        f"{', gradients sent as bf16' if run.cfg.grad_dtype == 'bf16' else ''}")


def numba_threads():
    import numba
    return numba.get_num_threads()


# -- the three ways to start ------------------------------------------------------------------------

def _fresh(cfg, world):
    cfg = resolve(cfg)
    data = read_data(cfg)
    arch = _arch(cfg, cfg.arch or data.default_arch, cfg.batch_norm, len(data.class_names))
    model = _new_model(cfg, arch)
    norm = measure_normalization(cfg, data.train, int(arch["input_size"]))
    return _assemble(cfg, data, arch, model, norm, world, fresh=True)


def _fine_tuned(cfg, world):
    state, pretrained = load_weights(cfg.load_pretrained)
    cfg = resolve(cfg)
    data = read_data(cfg)
    variant = cfg.arch or (pretrained.arch["variant"] if pretrained else data.default_arch)
    # A pretrained model with batch norm keeps it unless another variant was asked for.
    bn = cfg.batch_norm or bool(pretrained and cfg.arch is None and pretrained.arch.get("batch_norm"))
    arch = _arch(cfg, variant, bn, len(data.class_names))
    model = _new_model(cfg, arch)
    copy_pretrained(model, state, cfg.load_pretrained, len(data.class_names))
    size = int(arch["input_size"])
    if pretrained is not None and pretrained.normalization.get("crop") == size:
        say(f"using the normalisation of {cfg.load_pretrained}")
        norm = pretrained.normalization  # its features were learnt on inputs normalised this way
    else:
        norm = measure_normalization(cfg, data.train, size)
    return _assemble(cfg, data, arch, model, norm, world, fresh=False)


def _resumed(cfg, world):
    ckpt = load_checkpoint(cfg.resume)
    ts = ckpt.train_state or {}
    if "epoch" not in ts:
        raise CheckpointError(f"{cfg.resume}: holds weights only, no training state to resume; "
                              f"use -load_pretrained to start a new run from it")
    cfg = resolve(cfg, ts.get("config"), say)
    data = read_data(cfg, ckpt.class_names)
    arch = dict(ckpt.arch)
    cfg = replace(cfg, arch=arch["variant"], batch_norm=bool(arch.get("batch_norm", False)))
    model = _new_model(cfg, arch)
    load_into(model, ckpt.state_dict, cfg.resume)
    run = _assemble(cfg, data, arch, model, ckpt.normalization, world, fresh=False)
    run.history, run.best_val_top1 = list(ts.get("history", [])), ts.get("best_val_top1")
    run.resumed_world_size = ts.get("world_size", 1)
    run.start_epoch = _restore_training_state(ckpt, run.optimizer, run.scheduler)
    return run


# -- the pieces they share --------------------------------------------------------------------------

def _say_if_emulated(path, variable, flag, what, slower_than):
    if path == "emulated":
        why = f"{variable}=emulate" if os.environ.get(variable) == "emulate" else f"this CPU has no {flag}"
        say(f"warning: {what} is emulated ({why}): the same results as on a CPU with the instruction, "
            f"but slower than {slower_than}")


def check_bf16():
    """Say when -precision bf16 will be emulated (no AVX512_BF16, or MINIALEX_BF16=emulate); an
    unknown MINIALEX_BF16 fails here, before any work."""
    from .kernels.gemm_bf16 import bf16_path
    _say_if_emulated(bf16_path(), "MINIALEX_BF16", "AVX512_BF16", "-precision bf16", "-precision fp32")


def check_int8():
    """Say when int8 inference will be emulated (no AVX512_VNNI, or MINIALEX_INT8=emulate); an
    unknown MINIALEX_INT8 fails here, before any work."""
    from .kernels.gemm_int8 import int8_path
    _say_if_emulated(int8_path(), "MINIALEX_INT8", "AVX512_VNNI", "int8 inference", "the float32 model")


def set_threads(threads, world=None):
    """numba.set_num_threads(threads), checked against what Numba was started with. Without
    -threads, a process of a data-parallel `world` takes its share of its node's cores."""
    if threads is None and world is not None and world.distributed:
        threads = world.default_threads()
    if threads is None:
        return
    import numba
    limit = numba.config.NUMBA_NUM_THREADS
    if not 1 <= threads <= limit:
        raise MinialexError(f"-threads {threads}: must be between 1 and {limit} on this machine "
                            f"(NUMBA_NUM_THREADS)")
    numba.set_num_threads(threads)


def _arch(cfg, variant, batch_norm, num_classes):
    """The arch dict a new run's checkpoints carry (models.Arch, checked)."""
    from .models import Arch
    try:
        return Arch(variant, num_classes, bool(batch_norm), cfg.dropout).to_dict()
    except ValueError as e:
        raise MinialexError(f"cannot build the model: {e}") from None


def _new_model(cfg, arch):
    from .models import Arch, build
    _random.manual_seed(cfg.seed)  # initialisation, then dropout masks, come from the seed
    return build(Arch.from_dict(arch))


def _assemble(cfg, data, arch, model, norm, world, fresh):
    """The optimiser, schedule, loss and loaders around a built model."""
    from .data import DataLoader, EvalTransform, TrainTransform
    from .nn import CrossEntropyLoss
    cfg = replace(cfg, arch=arch["variant"], batch_norm=bool(arch.get("batch_norm", False)))
    opt, sched = make_optimizer(cfg, model)
    model.to_precision(cfg.precision)
    size = int(arch["input_size"])
    on_bad = "skip" if cfg.skip_bad_images else "error"
    mean, std, resize = norm["mean"], norm["std"], norm["resize"]
    augment = TrainTransform(size, resize, mean, std, pca=cfg.pca, eigval=norm.get("pca_eigval"),
                             eigvec=norm.get("pca_eigvec"))  # None: ImageNet's (older checkpoints)
    shard = (world.rank, world.size)
    train_loader = DataLoader(data.train, augment,
                              cfg.batch_size, shuffle=True, seed=cfg.seed, num_workers=cfg.workers,
                              on_bad_image=on_bad, shard=shard)
    val_loader = (DataLoader(data.val, EvalTransform(size, resize, mean, std), cfg.batch_size,
                             shuffle=False, num_workers=cfg.workers, on_bad_image=on_bad, shard=shard)
                  if data.val else None)
    return Run(cfg=cfg, model=model, optimizer=opt, scheduler=sched,
               loss_fn=CrossEntropyLoss(label_smoothing=cfg.label_smoothing),
               train_loader=train_loader, val_loader=val_loader, arch=arch,
               class_names=data.class_names, normalization=norm, lists=data.lists, fresh=fresh,
               world=world)


def make_optimizer(cfg, model):
    """(optimiser, scheduler or None) as a resolved config describes them."""
    from . import optim
    if cfg.optimizer == "sgd":
        opt = optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        opt = optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = None
    if cfg.schedule == "step":
        sched = optim.lr_scheduler.StepLR(opt, cfg.step_size, cfg.gamma)
    elif cfg.schedule == "multistep":
        sched = optim.lr_scheduler.MultiStepLR(opt, cfg.milestones, cfg.gamma)
    elif cfg.schedule == "plateau":
        sched = optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=cfg.gamma,
                                                     patience=cfg.patience)
    return opt, sched


def _last_layer_keys(model):
    last = len(model.classifier) - 1
    return [f"classifier.{last}.weight", f"classifier.{last}.bias"]


def copy_pretrained(model, state, path, num_classes):
    """Copy pretrained weights in; a different number of classes re-initialises the last layer."""
    state = dict(state)
    own = model.state_dict()
    head = _last_layer_keys(model)
    if all(k in state for k in head) and any(np.shape(state[k]) != own[k].shape for k in head):
        theirs = np.shape(state[head[1]])[0] if np.ndim(state[head[1]]) == 1 else "?"
        say(f"{path} has {theirs} classes, this data {num_classes}: re-initialising the last layer "
            f"({head[0].rsplit('.', 1)[0]}), keeping every other pretrained weight")
        for k in head:
            state[k] = own[k]
    load_into(model, state, path)


def _restore_training_state(ckpt, opt, sched):
    """Optimiser, schedule and random state from a checkpoint; returns the epoch to start at."""
    ts = ckpt.train_state
    try:
        if ckpt.optimizer_state is not None:
            opt.load_state_dict(ckpt.optimizer_state)
        if sched is not None and ckpt.scheduler_state is not None:
            sched.load_state_dict(ckpt.scheduler_state)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        raise CheckpointError(f"{ckpt.path}: optimiser state does not fit: {e}") from None
    if ts.get("rng") is not None:
        try:
            _random.get_generator().bit_generator.state = ts["rng"]
        except (ValueError, KeyError, TypeError, OverflowError) as e:
            raise CheckpointError(f"{ckpt.path}: damaged random state: {e}") from None
    if ts.get("interrupted"):
        say(f"{ckpt.path} was saved when epoch {ts['interrupted']['epoch']} was interrupted at batch "
            f"{ts['interrupted']['batch']}; that epoch starts over")
    return int(ts["epoch"]) + 1


# -- data -------------------------------------------------------------------------------------------

@dataclass
class Data:
    train: list
    val: list | None
    class_names: list
    lists: tuple
    default_arch: str


def read_data(cfg, class_names=None) -> Data:
    """The lists and labels a run trains on, checked; `class_names` are a resumed run's own."""
    from .data import demo_dataset, read_labels, read_list
    list_path, val_path, labels_path = cfg.list_path, cfg.val_path, cfg.labels_path
    default_arch = "torchvision"
    if list_path is None:
        if os.path.exists("images.list"):
            list_path = "images.list"
            say("no -list given: training on ./images.list")
        else:
            demo = demo_dataset()
            list_path = demo.train_list
            val_path = demo.test_list if val_path is None else val_path
            labels_path = demo.labels if labels_path is None else labels_path
            default_arch = "cifar"
            say(f"no -list given and no ./images.list: training on the built-in demo data ({list_path})")
    num_classes = len(class_names) if class_names is not None else None
    if class_names is None and labels_path is not None:
        class_names = read_labels(labels_path)
        num_classes = len(class_names)
    train = read_list(list_path, num_classes)
    val = read_list(val_path, num_classes) if val_path is not None else None
    if class_names is None:
        check_class_count(train, list_path)
        if val is not None:
            check_class_count(val, val_path)
        num_classes = max(s.label for s in train + (val or [])) + 1
        class_names = [f"class_{i}" for i in range(num_classes)]
    warn_duplicates(train, list_path)
    train = check_images_exist(train, list_path, cfg.skip_bad_images)
    if val is not None:
        val = check_images_exist(val, val_path, cfg.skip_bad_images)
    return Data(train, val, class_names, (list_path, val_path), default_arch)


def _missing(path):
    """Why `path` cannot be an image file, or None if it is a regular file."""
    if os.path.isfile(path):
        return None
    if os.path.isdir(path):
        return "is a folder, not an image"
    if os.path.islink(path):
        return "broken symbolic link or symbolic link loop"
    if os.path.exists(path):
        return "not a regular file (a device, FIFO or socket)"
    return "image not found"


def check_images_exist(samples, list_path, skip=False):
    """The samples whose files exist, checked before the first epoch, not hours in.

    Without `skip` the first missing file is a DataError naming its list line; with it, missing
    files are left out with one warning (and an error if none is left).
    """
    kept, dropped = [], []
    for s in samples:
        why = _missing(s.path)
        if why is None:
            kept.append(s)
        elif not skip:
            raise DataError(at_line(list_path, s.line, f"{why}: {s.path}"))
        else:
            dropped.append((s, why))
    if dropped:
        s, why = dropped[0]
        say(f"warning: {at_line(list_path, s.line, f'{why}: {s.path}')}; skipping {len(dropped)} "
            f"listed file(s) that are not images (-skip_bad)")
        if not kept:
            raise DataError(f"{list_path}: none of the {len(samples)} listed images exists")
    return kept


# Without a labels file the class count is the largest id + 1. A stray huge id ("99999 a.png" for
# "9 a.png") would silently build a classifier of that many outputs -- gigabytes -- so past this
# many classes every id up to the largest must be mostly in use, or a labels file must say so.
MAX_SPARSE_CLASSES = 1000


def check_class_count(samples, list_path):
    """DataError naming the line of the largest id when the ids are implausibly sparse."""
    largest = max(samples, key=lambda s: s.label)
    used = len({s.label for s in samples})
    if largest.label + 1 > max(MAX_SPARSE_CLASSES, 2 * used):
        raise DataError(at_line(list_path, largest.line,
                                f"class id {largest.label} means {largest.label + 1} classes, but the "
                                f"list uses only {used} distinct ids; fix the id, or give -labels "
                                f"naming every class if that many are meant"))


def warn_duplicates(samples, list_path):
    """Repeated lines are kept (repeating an image is a way to weigh it more), but said once."""
    from .data.listfile import duplicate_lines
    repeats, conflicts = duplicate_lines(samples)
    if conflicts:
        line, first, label, other = conflicts[0]
        say(f"warning: {list_path}:{line}: image also listed at line {first} with class {other}, here "
            f"class {label}; {len(conflicts)} such conflicting line(s): both labels are trained on")
    if repeats:
        line, first = repeats[0]
        say(f"warning: {list_path}: {len(repeats)} line(s) repeat an earlier image (line {line} repeats "
            f"line {first}); they are kept, so those images count more than once per epoch")


def measure_normalization(cfg, train, size):
    """Mean, std and the RGB principal components measured on (a sample of) the training list, and
    the resize/crop for `size`."""
    from .data import compute_stats
    from .data.transforms import MAX_RESIZE_RATIO, resize_for
    resize = cfg.resize or resize_for(size)
    if not size <= resize <= MAX_RESIZE_RATIO * size:
        raise MinialexError(f"-resize {resize}: must be from the {size}x{size} input size to "
                            f"{MAX_RESIZE_RATIO * size}")
    s = compute_stats(train, max_images=500, rng=np.random.default_rng(cfg.seed),
                      num_workers=max(1, cfg.workers))
    say("mean/std of the training images: " + " ".join(f"{m:.3f}/{d:.3f}" for m, d in zip(s.mean, s.std)))
    return {"mean": s.mean, "std": s.std, "pca_eigval": s.eigval, "pca_eigvec": s.eigvec,
            "resize": resize, "crop": size}


__all__ = ["Run", "prepare_run", "read_data", "measure_normalization", "make_optimizer", "set_threads",
           "check_images_exist", "check_class_count", "warn_duplicates"]
