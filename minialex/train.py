"""The training loop, and the evaluation and prediction the command line builds on.

One run: read the lists, build (or resume, or fine-tune) the model, then per epoch train over the
shuffled list, evaluate on the validation list, step the learning-rate schedule and checkpoint.

Guards, because a week-long run should fail early and loudly, never silently:
- the first batch's loss of a fresh model is compared with ln(num_classes), what an untrained
  classifier scores; far off means wrong labels or a bad normalisation, and we say so;
- every batch's loss and gradient norm are checked with np.isfinite (in plain NumPy, not in the
  fastmath kernels, where NaN checks may be optimised away); a NaN/inf stops the run before the
  optimiser step, so the last checkpoint on disk stays the last good one;
- SIGINT/SIGTERM are caught and acted on between batches: the model is saved (never half-updated)
  and the run ends with status 130 (SIGINT) or 143 (SIGTERM), as shells report those signals.

Exact resume: the checkpoint keeps the optimiser and scheduler state, the global Generator's state
(dropout masks) and the seed; batches and their augmentation depend only on (seed, epoch, sample),
so with one thread "2 epochs" and "1 epoch, then -resume for the 2nd" give identical weights.
"""
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from . import _random
from .checkpoint import build_model, load_checkpoint, load_into, load_weights, save_checkpoint
from .errors import CheckpointError, DataError, MinialexError, at_line
from .files import remove_stale_temps

DEFAULT_LR = {"sgd": 0.01, "adam": 1e-3}
# Hyper-parameters a resumed run takes from its checkpoint (the optimiser state only fits them).
RESUMED_FROM_CHECKPOINT = ("arch", "batch_norm", "optimizer", "lr", "momentum", "weight_decay",
                           "schedule", "step_size", "milestones", "gamma", "seed", "batch_size",
                           "dropout", "label_smoothing", "pca")


# Defaults of the hyper-parameters below that are None in a fresh TrainConfig: None means "not
# given", so that a resumed run can tell a deliberate change from a default.
DEFAULTS = {"epochs": 10, "batch_size": 32, "batch_norm": False, "dropout": 0.5, "optimizer": "sgd",
            "momentum": 0.9, "weight_decay": 5e-4, "schedule": "none", "gamma": 0.1,
            "label_smoothing": 0.0, "pca": False, "seed": 0}


@dataclass
class TrainConfig:
    list_path: str | None = None      # None: ./images.list if present, else the built-in demo data
    val_path: str | None = None
    labels_path: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    arch: str | None = None           # None: "cifar" on the demo data, "torchvision" otherwise
    batch_norm: bool | None = None
    dropout: float | None = None
    resize: int | None = None  # shorter side before cropping; default resize_for(input size)
    optimizer: str | None = None      # sgd | adam
    lr: float | None = None           # None: 0.01 for SGD, 0.001 for Adam
    momentum: float | None = None
    weight_decay: float | None = None
    schedule: str | None = None       # none | step | multistep | plateau
    step_size: int | None = None      # step: default a third of the epochs
    milestones: list = field(default_factory=list)  # multistep
    gamma: float | None = None
    label_smoothing: float | None = None
    pca: bool | None = None
    load_pretrained: str | None = None
    resume: str | None = None
    save: str | None = None           # None: alexnet.npz (or the -resume file when resuming)
    seed: int | None = None
    threads: int | None = None
    workers: int = 2
    skip_bad_images: bool = False
    log: str | None = None
    plot: str | None = None
    max_batches: int | None = None    # cut each epoch and evaluation short (smoke tests of a setup)


class Interrupted(Exception):
    """SIGINT/SIGTERM ended the run after saving; exit_code is 130 or 143."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code


class Diverged(MinialexError):
    """The loss or a gradient became NaN/inf."""


def _say(message):
    print(f"minialex: {message}", file=sys.stderr, flush=True)


# -- setup -----------------------------------------------------------------------------------------

def set_threads(threads):
    if threads is None:
        return
    import numba
    limit = numba.config.NUMBA_NUM_THREADS
    if not 1 <= threads <= limit:
        raise MinialexError(f"-threads {threads}: must be between 1 and {limit} on this machine "
                            f"(NUMBA_NUM_THREADS)")
    numba.set_num_threads(threads)


def check_writable_target(path, what="-save"):
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise MinialexError(f"{path}: {what} names a folder; give a file name such as alexnet.npz")
    if not os.path.isdir(folder):
        raise MinialexError(f"{path}: {what} folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise MinialexError(f"{path}: {what} folder is not writable")


def check_images_exist(samples, list_path):
    """Fail before training, not hours in, when the list names a file that is not there."""
    for s in samples:
        if not os.path.isfile(s.path):
            if os.path.isdir(s.path):
                what = "is a folder, not an image"
            elif os.path.islink(s.path):
                what = "broken symbolic link or symbolic link loop"
            elif os.path.exists(s.path):
                what = "not a regular file (a device, FIFO or socket)"
            else:
                what = "image not found"
            raise DataError(at_line(list_path, s.line, f"{what}: {s.path}"))


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
        _say(f"warning: {list_path}:{line}: image also listed at line {first} with class {other}, here "
             f"class {label}; {len(conflicts)} such conflicting line(s): both labels are trained on")
    if repeats:
        line, first = repeats[0]
        _say(f"warning: {list_path}: {len(repeats)} line(s) repeat an earlier image (line {line} repeats "
             f"line {first}); they are kept, so those images count more than once per epoch")


def _raise_first_bad_image(samples, list_path):
    """When no sampled image decodes, name the first bad one, its list line and the reason."""
    from .data import load_image
    for s in samples[:50]:
        try:
            load_image(s.path)
        except DataError as e:
            raise DataError(at_line(list_path, s.line, str(e))) from None


def _read_data(cfg, num_classes, class_names):
    """(train samples, val samples or None, class names, lists used, default arch)."""
    from .data import demo_dataset, read_labels, read_list
    list_path, val_path, labels_path = cfg.list_path, cfg.val_path, cfg.labels_path
    default_arch = "torchvision"
    if list_path is None:
        if os.path.exists("images.list"):
            list_path = "images.list"
            _say("no -list given: training on ./images.list")
        else:
            demo = demo_dataset()
            list_path = demo.train_list
            val_path = demo.test_list if val_path is None else val_path
            labels_path = demo.labels if labels_path is None else labels_path
            default_arch = "cifar"
            _say(f"no -list given and no ./images.list: training on the built-in demo data ({list_path})")
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
    if not cfg.skip_bad_images:
        check_images_exist(train, list_path)
        if val is not None:
            check_images_exist(val, val_path)
    return train, val, class_names, (list_path, val_path), default_arch


def _make_optimizer(cfg, model):
    from . import optim
    if cfg.optimizer == "sgd":
        opt = optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adam":
        opt = optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        raise MinialexError(f"-optimizer {cfg.optimizer}: choose sgd or adam")
    sched = None
    if cfg.schedule == "step":
        sched = optim.lr_scheduler.StepLR(opt, cfg.step_size or max(1, cfg.epochs // 3), cfg.gamma)
    elif cfg.schedule == "multistep":
        sched = optim.lr_scheduler.MultiStepLR(opt, cfg.milestones, cfg.gamma)
    elif cfg.schedule == "plateau":
        # The paper's rule (divide by 10 when validation stalls) with a patience short runs can use.
        sched = optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=cfg.gamma, patience=2)
    elif cfg.schedule != "none":
        raise MinialexError(f"-schedule {cfg.schedule}: choose none, step, multistep or plateau")
    return opt, sched


def _last_layer_keys(model):
    last = len(model.classifier) - 1
    return [f"classifier.{last}.weight", f"classifier.{last}.bias"]


def _load_pretrained(model, path, num_classes):
    """Copy pretrained weights in; a different number of classes re-initialises the last layer."""
    state, _ = load_weights(path)
    state = dict(state)
    own = model.state_dict()
    head = _last_layer_keys(model)
    if all(k in state for k in head) and any(np.shape(state[k]) != own[k].shape for k in head):
        theirs = np.shape(state[head[1]])[0]
        _say(f"{path} has {theirs} classes, this data {num_classes}: re-initialising the last layer "
             f"({head[0].rsplit('.', 1)[0]}), keeping every other pretrained weight")
        for k in head:
            state[k] = own[k]
    load_into(model, state, path)


def _resolve(cfg, resumed_config):
    """Fill defaults; when resuming, training hyper-parameters come from the checkpoint."""
    cfg = TrainConfig(**asdict(cfg))
    if resumed_config:
        changed = []
        for name in RESUMED_FROM_CHECKPOINT:
            if name in resumed_config:
                if getattr(cfg, name) not in (None, [], resumed_config[name]):
                    changed.append(name)
                setattr(cfg, name, resumed_config[name])
        if changed:
            _say(f"resuming: {', '.join(changed)} taken from the checkpoint, not the command line")
    for name, value in DEFAULTS.items():
        if getattr(cfg, name) is None:
            setattr(cfg, name, value)
    if cfg.lr is None:
        cfg.lr = DEFAULT_LR.get(cfg.optimizer, 0.01)
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise MinialexError(f"-epochs and -batchsize must be at least 1 (got {cfg.epochs}, {cfg.batch_size})")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise MinialexError(f"-lr {cfg.lr}: the learning rate must be a positive number")
    checks = [("-momentum", cfg.momentum, 0 <= cfg.momentum < 1, "at least 0 and below 1"),
              ("-wd", cfg.weight_decay, 0 <= cfg.weight_decay < math.inf, "0 or more"),
              ("-dropout", cfg.dropout, 0 <= cfg.dropout < 1, "at least 0 and below 1"),
              ("-label_smoothing", cfg.label_smoothing, 0 <= cfg.label_smoothing <= 1, "between 0 and 1"),
              ("-gamma", cfg.gamma, 0 < cfg.gamma < 1, "between 0 and 1 (exclusive)")]
    for flag, value, ok, rule in checks:
        if not ok:
            raise MinialexError(f"{flag} {value}: must be {rule}")
    return cfg


# -- the loop ---------------------------------------------------------------------------------------

class _SignalStop:
    """Turn SIGINT/SIGTERM into a flag checked between batches; a second signal aborts at once."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        _say("stopping after this batch and saving (signal again to quit without saving)")

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False

    @property
    def exit_code(self):
        return 128 + int(self.signum)


class _Progress:
    """tqdm bar on a terminal; otherwise a plain status line at most every `every` seconds."""

    def __init__(self, total, desc):
        self.total, self.desc = total, desc
        self.start = time.perf_counter()
        self.last = self.start
        self.bar = None
        tty = sys.stderr.isatty()
        self.tty = tty
        self.every = 0.5 if tty else 30.0
        if tty:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc=desc, unit="batch", file=sys.stderr, leave=False,
                                dynamic_ncols=True, mininterval=0.5)
            except ImportError:
                pass

    def update(self, done, images, loss, acc):
        now = time.perf_counter()
        rate = images / max(now - self.start, 1e-9)
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f} acc {acc:.1%} {rate:.0f} img/s", refresh=False)
            self.bar.update(1)
            return
        # Off a terminal (a log file), only every `every` seconds: the epoch line sums it up anyway.
        if now - self.last >= self.every or (done == self.total and self.tty):
            self.last = now
            eta = (now - self.start) / done * (self.total - done)
            end = "\r" if self.tty else "\n"
            sys.stderr.write(f"{self.desc} {done}/{self.total} loss {loss:.4f} acc {acc:.1%} "
                             f"{rate:.0f} img/s ETA {eta:.0f}s   {end}")
            sys.stderr.flush()

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.tty:
            sys.stderr.write("\n")


def grad_norm(params, chunk=1 << 20):
    """Global L2 norm of the gradients, by chunks so that no full-size temporary is made."""
    total = 0.0
    scratch = np.empty(chunk, dtype=np.float64)
    for p in params:
        g = p.grad.reshape(-1)
        for i in range(0, g.size, chunk):
            part = scratch[:min(chunk, g.size - i)]
            np.square(g[i:i + chunk], out=part, dtype=np.float64)
            total += float(part.sum())
    return math.sqrt(total)


def _check_first_loss(loss, num_classes):
    expected = math.log(num_classes)
    if abs(loss - expected) > max(1.0, 0.5 * expected):
        _say(f"warning: first batch loss {loss:.3f} is far from ln({num_classes}) = {expected:.3f}, "
             f"what an untrained model should score: check that the class ids in the list match "
             f"the images and that the images are normalised sensibly")


def _diverged(what, epoch, batch, lr, save_path):
    kept = f"{save_path} left as it was" if os.path.exists(save_path) else "nothing saved"
    return Diverged(f"{what} at epoch {epoch}, batch {batch}: training stopped, {kept}; "
                    f"try a lower learning rate (e.g. -lr {lr / 10:g})")


def _with_list_line(error, samples, list_path):
    """A bad image's DataError, prefixed with the list file and line that named the image."""
    message = str(error)
    for s in samples:
        if message.startswith(f"{s.path}:"):
            return DataError(at_line(list_path, s.line, message))
    return error


def train_epoch(model, loss_fn, opt, loader, epoch, cfg, stop, first_check):
    """One pass over the loader; returns (loss, accuracy, images, seconds) or raises."""
    model.train()
    params = model.parameters()
    total = len(loader) if cfg.max_batches is None else min(len(loader), cfg.max_batches)
    progress = _Progress(total, f"epoch {epoch}/{cfg.epochs}")
    loss_sum, correct, seen, done = 0.0, 0, 0, 0
    start = time.perf_counter()
    try:
        for x, y in loader:
            batch = done + 1
            logits = model(x)
            loss = float(loss_fn(logits, y))
            if not math.isfinite(loss):
                raise _diverged(f"loss is {loss}", epoch, batch, opt.param_groups[0]["lr"], cfg.save)
            if first_check is not None and done == 0:
                first_check(loss)
            opt.zero_grad()
            model.backward(loss_fn.backward())
            norm = grad_norm(params)
            if not np.isfinite(norm):
                raise _diverged(f"gradient norm is {norm}", epoch, batch, opt.param_groups[0]["lr"], cfg.save)
            opt.step()
            n = len(y)
            loss_sum += loss * n
            correct += int((np.argmax(logits, axis=1) == y).sum())
            seen += n
            done += 1
            progress.update(done, seen, loss_sum / seen, correct / seen)
            if stop.signum is not None:
                return None, done
            if done >= total:
                break
    finally:
        progress.close()
    return (loss_sum / max(seen, 1), correct / max(seen, 1), seen, time.perf_counter() - start), done


def _softmax(logits):
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def evaluate(model, loader, num_classes, loss_fn=None, max_batches=None):
    """{"loss", "top1", "top5", "n", "confusion"} over the loader (or its first batches), in eval mode."""
    from .nn import CrossEntropyLoss
    loss_fn = loss_fn or CrossEntropyLoss()
    model.eval()
    k = min(5, num_classes)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    loss_sum, top1, topk, n = 0.0, 0, 0, 0
    for batch, (x, y) in enumerate(loader, 1):
        logits = model(x)
        loss_sum += float(loss_fn(logits, y)) * len(y)
        pred = np.argmax(logits, axis=1)
        best = np.argpartition(-logits, k - 1, axis=1)[:, :k]
        top1 += int((pred == y).sum())
        topk += int((best == y[:, None]).any(axis=1).sum())
        np.add.at(confusion, (y, pred), 1)
        n += len(y)
        if max_batches is not None and batch >= max_batches:
            break
    n_safe = max(n, 1)
    return {"loss": loss_sum / n_safe, "top1": top1 / n_safe, "top5": topk / n_safe, "n": n,
            "confusion": confusion}


def _epoch_line(r, epochs):
    val = (f"val loss {r['val_loss']:.4f} top-1 {r['val_top1']:.2%} top-5 {r['val_top5']:.2%}"
           if r.get("val_top1") is not None else "no validation list")
    return (f"epoch {r['epoch']}/{epochs}  train loss {r['train_loss']:.4f} acc {r['train_acc']:.2%}  "
            f"{val}  lr {r['lr']:.3g}  time {r['time']:.1f}s ({r['images_per_s']:.0f} img/s)  "
            f"data wait {r['data_wait']:.1f}s  skipped {r['skipped']}")


def memory_use():
    """{"rss_mb", "peak_rss_mb"} of this process from /proc (None where there is no /proc)."""
    found = {"rss_mb": None, "peak_rss_mb": None}
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key = "rss_mb" if line.startswith("VmRSS:") else "peak_rss_mb"
                    found[key] = round(int(line.split()[1]) / 1024, 1)  # reported in kB
    except (OSError, ValueError, IndexError):
        pass
    return found


def _append_log(path, record):
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise MinialexError(f"{path}: cannot write the log: {e.strerror or e}") from None


def _normalization(cfg, ckpt, pretrained, train, list_path, size):
    """The checkpoint's, a same-size pretrained model's, or mean/std measured on the training list."""
    from .data import compute_mean_std
    from .data.transforms import resize_for
    if ckpt:
        return ckpt.normalization
    if pretrained is not None and pretrained.normalization.get("crop") == size:
        _say(f"using the normalisation of {cfg.load_pretrained}")
        return pretrained.normalization  # its features were learnt on inputs normalised this way
    try:
        mean, std = compute_mean_std(train, max_images=500, rng=np.random.default_rng(cfg.seed),
                                     num_workers=max(1, cfg.workers))
    except DataError:
        _raise_first_bad_image(train, list_path)
        raise
    _say("mean/std of the training images: " + " ".join(f"{m:.3f}/{s:.3f}" for m, s in zip(mean, std)))
    resize = cfg.resize if cfg.resize else resize_for(size)
    if resize < size:
        raise MinialexError(f"-resize {resize} is smaller than the {size}x{size} input")
    return {"mean": mean, "std": std, "resize": resize, "crop": size}


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
        _say(f"{ckpt.path} was saved when epoch {ts['interrupted']['epoch']} was interrupted at batch "
             f"{ts['interrupted']['batch']}; that epoch starts over")
    return int(ts["epoch"]) + 1


def run_training(cfg: TrainConfig) -> dict:
    """Train as `cfg` says; returns the final train_state (epoch, history, best, ...)."""
    from .data import DataLoader, EvalTransform, TrainTransform
    from .models import INPUT_SIZE
    from .nn import CrossEntropyLoss

    set_threads(cfg.threads)
    ckpt = load_checkpoint(cfg.resume) if cfg.resume else None
    if cfg.save is None:
        cfg = TrainConfig(**{**asdict(cfg), "save": cfg.resume or "alexnet.npz"})
    check_writable_target(cfg.save)
    if remove_stale_temps(cfg.save):
        _say(f"removed temporary files a killed save of {cfg.save} left behind")
    if cfg.plot:
        from .plot import require_matplotlib
        require_matplotlib()
    ts = (ckpt.train_state or {}) if ckpt else {}
    if ckpt and "epoch" not in ts:
        raise CheckpointError(f"{cfg.resume}: holds weights only, no training state to resume; "
                              f"use -load_pretrained to start a new run from it")
    cfg = _resolve(cfg, ts.get("config"))

    train, val, class_names, lists, default_arch = _read_data(
        cfg, len(ckpt.class_names) if ckpt else None, ckpt.class_names if ckpt else None)
    num_classes = len(class_names)
    pretrained = None
    if ckpt is None and cfg.load_pretrained:
        _, pretrained = load_weights(cfg.load_pretrained)
    if ckpt:
        arch = dict(ckpt.arch)
    else:
        variant = cfg.arch or (pretrained.arch["variant"] if pretrained else default_arch)
        if variant not in INPUT_SIZE:
            raise MinialexError(f"-arch {variant}: choose one of {', '.join(INPUT_SIZE)}")
        bn = cfg.batch_norm or bool(pretrained and cfg.arch is None and pretrained.arch.get("batch_norm"))
        arch = {"variant": variant, "num_classes": num_classes, "batch_norm": bn,
                "input_size": INPUT_SIZE[variant], "dropout": cfg.dropout}
    cfg.arch, cfg.batch_norm = arch["variant"], bool(arch.get("batch_norm", False))

    _random.manual_seed(cfg.seed)
    model = build_model(arch)
    if ckpt:
        load_into(model, ckpt.state_dict, cfg.resume)
    elif cfg.load_pretrained:
        _load_pretrained(model, cfg.load_pretrained, num_classes)

    size = int(arch["input_size"])
    norm = _normalization(cfg, ckpt, pretrained, train, lists[0], size)
    opt, sched = _make_optimizer(cfg, model)
    history, best = list(ts.get("history", [])), ts.get("best_val_top1")
    start_epoch = 1
    if ckpt:
        start_epoch = _restore_training_state(ckpt, opt, sched)
        if start_epoch > cfg.epochs:
            _say(f"{cfg.resume} has already trained {ts['epoch']} epochs; nothing to do "
                 f"(ask for more with -epochs)")
            return ts

    on_bad = "skip" if cfg.skip_bad_images else "error"
    mean, std, resize = norm["mean"], norm["std"], norm["resize"]
    train_loader = DataLoader(train, TrainTransform(size, resize, mean, std, pca=cfg.pca), cfg.batch_size,
                              shuffle=True, seed=cfg.seed, num_workers=cfg.workers, on_bad_image=on_bad)
    val_loader = (DataLoader(val, EvalTransform(size, resize, mean, std), cfg.batch_size, shuffle=False,
                             num_workers=cfg.workers, on_bad_image=on_bad) if val else None)
    loss_fn = CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    fresh = ckpt is None and not cfg.load_pretrained
    config = {k: v for k, v in asdict(cfg).items() if k in RESUMED_FROM_CHECKPOINT}
    meta = {"arch": arch, "class_names": class_names, "normalization": norm}

    def state(epoch, **extra):
        return {"epoch": epoch, "history": history, "best_val_top1": best, "config": config,
                "rng": _random.get_generator().bit_generator.state,
                "lists": {"train": lists[0], "val": lists[1]}, **extra}

    _say(f"training {arch['variant']}{' +BN' if arch.get('batch_norm') else ''} on {len(train)} images, "
         f"{num_classes} classes, {cfg.optimizer} lr {opt.param_groups[0]['lr']:g}, batch {cfg.batch_size}, "
         f"epochs {start_epoch}..{cfg.epochs}; checkpoints to {cfg.save}")
    with _SignalStop() as stop:
        for epoch in range(start_epoch, cfg.epochs + 1):
            train_loader.set_epoch(epoch)
            lr = float(opt.param_groups[0]["lr"])
            check = (lambda loss: _check_first_loss(loss, num_classes)) if fresh and epoch == 1 else None
            try:
                result, done = train_epoch(model, loss_fn, opt, train_loader, epoch, cfg, stop, check)
            except DataError as e:
                raise _with_list_line(e, train, lists[0]) from None
            if result is None:
                save_checkpoint(cfg.save, model, optimizer=opt, scheduler=sched, **meta,
                                train_state=state(epoch - 1, interrupted={"epoch": epoch, "batch": done}))
                name = signal.Signals(stop.signum).name
                raise Interrupted(f"{name} in epoch {epoch} at batch {done}: saved {cfg.save}; "
                                  f"-resume {cfg.save} restarts epoch {epoch}", stop.exit_code)
            train_loss, train_acc, images, seconds = result
            try:
                v = evaluate(model, val_loader, num_classes, max_batches=cfg.max_batches) if val_loader else None
            except DataError as e:
                raise _with_list_line(e, val, lists[1]) from None
            if sched is not None:
                if cfg.schedule == "plateau":
                    sched.step(v["loss"] if v else train_loss)
                else:
                    sched.step()
            if v and (best is None or v["top1"] > best):
                best = v["top1"]
            record = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
                      "val_loss": v["loss"] if v else None, "val_top1": v["top1"] if v else None,
                      "val_top5": v["top5"] if v else None, "lr": lr, "time": seconds,
                      "images_per_s": images / max(seconds, 1e-9),
                      "data_wait": train_loader.wait_time, "skipped": train_loader.skipped,
                      **memory_use()}
            history.append(record)
            save_checkpoint(cfg.save, model, optimizer=opt, scheduler=sched, **meta, train_state=state(epoch))
            print(_epoch_line(record, cfg.epochs), flush=True)
            if cfg.log:
                _append_log(cfg.log, record)
            if cfg.plot:
                from .plot import plot_curves
                plot_curves(history, cfg.plot)
            if stop.signum is not None:
                name = signal.Signals(stop.signum).name
                raise Interrupted(f"{name} after epoch {epoch}: saved {cfg.save}", stop.exit_code)
    return state(cfg.epochs)


# -- evaluation and prediction on a saved model ----------------------------------------------------

def _eval_transform(ckpt):
    from .data import EvalTransform
    n = ckpt.normalization
    return EvalTransform(int(n["crop"]), int(n["resize"]), n["mean"], n["std"])


def run_eval(list_path, weights, batch_size=32, workers=2, threads=None):
    """Load `weights`, evaluate on `list_path`; returns (checkpoint, evaluate() result)."""
    from .checkpoint import model_from_checkpoint
    from .data import DataLoader, read_list
    set_threads(threads)
    ckpt = load_checkpoint(weights)
    model = model_from_checkpoint(ckpt)
    num_classes = len(ckpt.class_names)
    samples = read_list(list_path, num_classes)
    check_images_exist(samples, list_path)
    loader = DataLoader(samples, _eval_transform(ckpt), batch_size, shuffle=False, num_workers=workers,
                        on_bad_image="error")
    try:
        return ckpt, evaluate(model, loader, num_classes)
    except DataError as e:
        raise _with_list_line(e, samples, list_path) from None


def format_confusion(confusion, class_names, max_classes=20):
    """Text confusion matrix (rows: true class, columns: predicted), or the worst classes if large."""
    c = len(class_names)
    per_class = confusion.diagonal() / np.maximum(confusion.sum(axis=1), 1)
    if c > max_classes:
        lines = [f"{c} classes: the {max_classes} with the lowest accuracy (true class, accuracy, images)"]
        present = np.flatnonzero(confusion.sum(axis=1))
        for i in present[np.argsort(per_class[present], kind="stable")][:max_classes]:
            lines.append(f"  {i:>5} {class_names[i][:30]:<30} {per_class[i]:7.2%} {confusion[i].sum():>7}")
        return "\n".join(lines)
    width = max(5, len(str(confusion.max())) + 1)
    names = [n[:14] for n in class_names]
    label_w = max(len(n) for n in names) + 6
    header = " " * label_w + "".join(f"{i:>{width}}" for i in range(c)) + "   accuracy"
    lines = ["confusion matrix (rows: true class, columns: predicted class id)", header]
    for i in range(c):
        row = "".join(f"{v:>{width}}" for v in confusion[i])
        lines.append(f"{i:>3} {names[i]:<{label_w - 4}}{row}   {per_class[i]:.2%}")
    return "\n".join(lines)


def predict(image_paths, weights, topk=5, threads=None, batch_size=16):
    """[(path, [(class_id, name, probability), ...])] for each image, best first."""
    from .checkpoint import model_from_checkpoint
    from .data import load_image
    set_threads(threads)
    ckpt = load_checkpoint(weights)
    model = model_from_checkpoint(ckpt)
    transform = _eval_transform(ckpt)
    for p in image_paths:
        if os.path.isdir(p):
            raise DataError(f"{p}: is a folder, not an image")
    k = max(1, min(int(topk), len(ckpt.class_names)))
    results = []
    for i in range(0, len(image_paths), batch_size):
        chunk = image_paths[i:i + batch_size]
        x = np.stack([transform(load_image(p)) for p in chunk])
        probs = _softmax(model(x))
        for p, row in zip(chunk, probs):
            order = np.argsort(-row, kind="stable")[:k]
            results.append((p, [(int(c), ckpt.class_names[c], float(row[c])) for c in order]))
    return results


__all__ = ["TrainConfig", "Interrupted", "Diverged", "run_training", "train_epoch", "evaluate",
           "run_eval", "predict", "format_confusion", "grad_norm"]
