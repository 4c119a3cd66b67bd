"""Every option of a training run, described once: `TrainConfig`'s fields.

Each field's metadata (made by `option`) holds its command-line flag, help text, default, type,
choices, the rule its value must obey and whether a resumed run keeps the checkpoint's value. The
`train` command's parser, the defaults, the validation and the set of hyper-parameters a resume
takes from its checkpoint are all generated from here: adding an option touches this file only.

A field is None until given, so a resumed run can tell a deliberate change from a default;
`resolve` fills the defaults and checks every value. Only the standard library is imported, so
`minialex -h` answers without loading NumPy or Numba.
"""
import math
from argparse import ArgumentTypeError
from dataclasses import asdict, dataclass, field, fields, replace

from .errors import MinialexError

DEFAULT_LR = {"sgd": 0.01, "adam": 1e-3}
# Far beyond any CPU's memory at AlexNet's sizes; a checkpoint asking for more is damaged.
MAX_BATCH_SIZE = 65536
ARCHS = ("torchvision", "paper", "cifar")


def positive_int(text):
    """argparse type: an integer of at least 1."""
    value = _int(text)
    if value < 1:
        raise ArgumentTypeError(f"{text} must be at least 1")
    return value


def non_negative_int(text):
    """argparse type: an integer of at least 0."""
    value = _int(text)
    if value < 0:
        raise ArgumentTypeError(f"{text} must be 0 or more")
    return value


def _int(text):
    try:
        return int(text)
    except ValueError:
        raise ArgumentTypeError(f"{text!r} is not an integer") from None


def finite_float(text):
    """argparse type: a finite number (nan and inf are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise ArgumentTypeError(f"{text} is not a finite number")
    return value


def epoch_list(text):
    """argparse type: '5,8' or '5 8' -> [5, 8], each epoch at least 1, increasing."""
    try:
        epochs = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ArgumentTypeError(f"{text!r}: give epochs as integers, e.g. 5,8") from None
    if not epochs or any(e < 1 for e in epochs) or epochs != sorted(set(epochs)):
        raise ArgumentTypeError(f"{text!r}: give increasing epochs of at least 1, e.g. 5,8")
    return epochs


def option(help, *, flag=None, default=None, type=None, choices=None, check=None, resumable=False,
           metavar=None, switch=False, cli=True):
    """A TrainConfig field: None until given, with everything the parser and the checks need.

    flag: the command-line name (default: the field's name); default: the value `resolve` fills in,
    or a function of the resolved config; check: (predicate, rule in words) for the value;
    resumable: a resumed run takes the checkpoint's value, not the command line's.
    """
    meta = {"help": help, "flag": flag, "default": default, "type": type, "choices": choices,
            "check": check, "resumable": resumable, "metavar": metavar, "switch": switch, "cli": cli}
    return field(default=None, metadata=meta)


@dataclass
class TrainConfig:
    list_path: str | None = option(
        "training list of 'class_id image_path' lines (default: ./images.list if it exists, else the "
        "built-in Fashion-MNIST demo data, with its test list as -val)", flag="list", metavar="F")
    val_path: str | None = option("validation list, evaluated after every epoch", flag="val", metavar="F")
    labels_path: str | None = option("labels file of 'class_id name' lines (default: names class_<id>)",
                                     flag="labels", metavar="F")
    epochs: int | None = option("total epochs, counting resumed ones", default=10, type=positive_int,
                                metavar="N")
    batch_size: int | None = option("images per batch", flag="batchsize", default=32, type=positive_int,
                                    metavar="N", resumable=True,
                                    check=(lambda v: v <= MAX_BATCH_SIZE, f"at most {MAX_BATCH_SIZE}"))
    arch: str | None = option("AlexNet variant (default: cifar on the demo data, torchvision otherwise)",
                              choices=ARCHS, resumable=True)
    batch_norm: bool | None = option("batch normalisation after each convolution", flag="bn", default=False,
                                     switch=True, resumable=True)
    dropout: float | None = option("dropout probability of the classifier", default=0.5, type=finite_float,
                                   metavar="P", check=(lambda v: 0 <= v < 1, "at least 0 and below 1"),
                                   resumable=True)
    resize: int | None = option(
        "shorter side the images are resized to before the crop (default: 256 for 224 and 227 "
        "inputs, 36 for 32)", type=positive_int, metavar="N")
    optimizer: str | None = option("optimiser", default="sgd", choices=("sgd", "adam"), resumable=True)
    lr: float | None = option("learning rate (default 0.01 for sgd, 0.001 for adam)", type=finite_float,
                              metavar="LR", default=lambda c: DEFAULT_LR[c.optimizer],
                              check=(lambda v: v > 0, "a positive number"), resumable=True)
    momentum: float | None = option("SGD momentum (-optimizer sgd only; Adam's betas are 0.9, 0.999)",
                                    default=0.9, type=finite_float, metavar="M",
                                    check=(lambda v: 0 <= v < 1, "at least 0 and below 1"), resumable=True)
    weight_decay: float | None = option("weight decay", flag="wd", default=5e-4, type=finite_float,
                                        metavar="WD", check=(lambda v: v >= 0, "0 or more"), resumable=True)
    schedule: str | None = option(
        "learning-rate schedule: step multiplies the rate by -gamma every -step_size epochs, multistep "
        "at each of -milestones, plateau when the loss it watches (validation loss with -val, else "
        "training loss) has not improved for -patience epochs", default="none",
        choices=("none", "step", "multistep", "plateau"), resumable=True)
    step_size: int | None = option("epochs between steps of -schedule step (default a third of -epochs)",
                                   type=positive_int, metavar="N",
                                   default=lambda c: max(1, c.epochs // 3), resumable=True)
    milestones: list | None = option("epochs where -schedule multistep steps, e.g. 5,8", type=epoch_list,
                                     metavar="E,E", default=lambda c: [], resumable=True)
    gamma: float | None = option("factor of each learning-rate step", default=0.1, type=finite_float,
                                 metavar="G", check=(lambda v: 0 < v < 1, "between 0 and 1 (exclusive)"),
                                 resumable=True)
    patience: int | None = option("epochs without improvement before -schedule plateau steps",
                                  default=2, type=non_negative_int, metavar="N", resumable=True)
    label_smoothing: float | None = option("label smoothing", default=0.0, type=finite_float, metavar="S",
                                           check=(lambda v: 0 <= v <= 1, "between 0 and 1"),
                                           resumable=True)
    precision: str | None = option(
        "arithmetic of the convolution and linear layers: fp32, or bf16 (operands rounded to bfloat16, "
        "sums, weights, gradients and optimiser state float32; emulated, slower, on CPUs without "
        "AVX512_BF16); a resumed run takes the command line's", default="fp32", choices=("fp32", "bf16"))
    grad_dtype: str | None = option("data-parallel runs: gradients travel as fp32, or as bf16 with error "
                                    "feedback (half the bytes; what rounding drops goes with the next step)",
                                    default="fp32", choices=("fp32", "bf16"))
    sync_bn: bool | None = option("data-parallel runs: batch norm statistics over the global batch, "
                                  "not each process's own (as torch.nn.SyncBatchNorm)", default=False,
                                  switch=True, resumable=True)
    pca: bool | None = option("the paper's PCA colour augmentation, with the principal components of "
                              "the training images", default=False, switch=True, resumable=True)
    load_pretrained: str | None = option(
        "start from these weights (a checkpoint or an .npz state_dict); another class count "
        "re-initialises the last layer", metavar="W")
    resume: str | None = option("continue a run from its checkpoint: model, optimiser, schedule, epoch "
                                "and random state (hyper-parameters come from it)", metavar="CKPT")
    save: str | None = option("checkpoint file, rewritten atomically every epoch (default: alexnet.npz in "
                              "the current folder; the -resume file when resuming)", metavar="W")
    seed: int | None = option("random seed", default=0, type=non_negative_int, metavar="S", resumable=True)
    threads: int | None = option("compute threads (numba.set_num_threads; default all cores)",
                                 type=positive_int, metavar="T")
    workers: int | None = option("image decoding threads (0 decodes inline)", default=2,
                                 type=non_negative_int, metavar="N")
    skip_bad_images: bool | None = option("skip unreadable or missing images with a warning instead of "
                                          "stopping", flag="skip_bad", default=False, switch=True)
    log: str | None = option("append one JSON object per epoch to this file", metavar="F.jsonl")
    plot: str | None = option("draw loss/accuracy curves after every epoch (needs matplotlib)",
                              metavar="F.png")
    max_batches: int | None = option("cut each epoch and evaluation short (smoke tests of a set-up)",
                                     cli=False)


def options():
    """(field, metadata) of every TrainConfig option, in declaration order."""
    return [(f, f.metadata) for f in fields(TrainConfig)]


def flag_of(name):
    """The command-line spelling of field `name`, for messages: '-batchsize'."""
    meta = TrainConfig.__dataclass_fields__[name].metadata
    return f"-{meta['flag'] or name}"


RESUMABLE = tuple(f.name for f, meta in options() if meta["resumable"])


def add_option(parser, name, **kw):
    """Register -name, --name and (for names with underscores) --name-with-dashes on an argparse
    parser: one dash, as the C AlexNet's options had; two work too."""
    spellings = [f"-{name}", f"--{name}"]
    if "_" in name:
        spellings.append(f"--{name.replace('_', '-')}")
    kw.setdefault("dest", name)
    parser.add_argument(*spellings, **kw)


def add_train_options(parser):
    """Register every TrainConfig option on `parser`."""
    for f, meta in options():
        if not meta["cli"]:
            continue
        kw = {"help": meta["help"]}
        default = meta["default"]
        if default is not None and not callable(default) and not meta["switch"]:
            kw["help"] += f" (default {default})"
        if meta["switch"]:
            kw.update(action="store_true", default=None)
        else:
            for key in ("type", "choices", "metavar"):
                if meta[key] is not None:
                    kw[key] = meta[key]
        add_option(parser, meta["flag"] or f.name, dest=f.name, **kw)


def resolve(cfg: TrainConfig, resumed: dict | None = None, say=None) -> TrainConfig:
    """`cfg` with the checkpoint's hyper-parameters when resuming, defaults filled, values checked.

    `resumed` is the config a checkpoint stored; `say` reports options the checkpoint overrode.
    """
    given, cfg = cfg, replace(cfg)
    if resumed:
        changed = []
        for name in RESUMABLE:
            if name in resumed:
                mine = getattr(cfg, name)
                if mine not in (None, [], resumed[name]):
                    changed.append(flag_of(name))
                setattr(cfg, name, resumed[name])
        if changed and say:
            say(f"resuming: {', '.join(changed)} taken from the checkpoint, not the command line")
    for f, meta in options():
        if getattr(cfg, f.name) is None and meta["default"] is not None:
            default = meta["default"]
            setattr(cfg, f.name, default(cfg) if callable(default) else default)
    if given.momentum is not None and cfg.optimizer != "sgd":
        raise MinialexError(f"-momentum is SGD's; -optimizer {cfg.optimizer} would ignore it (Adam's "
                            f"moments use betas 0.9, 0.999): drop -momentum or use -optimizer sgd")
    check(cfg)
    return cfg


def check(cfg: TrainConfig):
    """MinialexError naming the flag of the first value that breaks its option's rule."""
    for f, meta in options():
        value = getattr(cfg, f.name)
        if value is None:
            continue
        flag = flag_of(f.name)
        if meta["choices"] is not None and value not in meta["choices"]:
            raise MinialexError(f"{flag} {value}: choose one of {', '.join(meta['choices'])}")
        kind = meta["type"]
        if kind is not None and kind is not epoch_list:
            try:
                ok = not isinstance(value, bool) and kind(str(value)) == value
            except ArgumentTypeError as e:
                raise MinialexError(f"{flag}: {e}") from None
            if not ok:
                raise MinialexError(f"{flag} {value!r}: not a valid value")
        if kind is epoch_list:
            if not (isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool)
                                                    for v in value)):
                raise MinialexError(f"{flag} {value!r}: give epochs as integers")
            if value:
                try:
                    epoch_list(",".join(map(str, value)))
                except ArgumentTypeError as e:
                    raise MinialexError(f"{flag} {e}") from None
        if meta["switch"] and not isinstance(value, bool):
            raise MinialexError(f"{flag} {value!r}: must be true or false")
        rule = meta["check"]
        if rule is not None and not rule[0](value):
            raise MinialexError(f"{flag} {value}: must be {rule[1]}")
    if cfg.schedule == "multistep" and not cfg.milestones:
        raise MinialexError("-schedule multistep needs -milestones, e.g. -milestones 5,8")
    if cfg.resume and cfg.load_pretrained:
        raise MinialexError("give -resume (continue a run) or -load_pretrained (start a new one from "
                            "weights), not both")


def check_resumable(values: dict):
    """MinialexError naming the option of the first value a checkpoint's stored config holds that
    the option's own rule refuses (what a resume would take from it)."""
    known = {k: v for k, v in values.items() if k in RESUMABLE}
    check(TrainConfig(**known))


def resumable_values(cfg: TrainConfig) -> dict:
    """The hyper-parameters a checkpoint stores for a later resume."""
    return {k: v for k, v in asdict(cfg).items() if k in RESUMABLE}


__all__ = ["TrainConfig", "option", "options", "flag_of", "RESUMABLE", "add_option", "add_train_options", "resolve",
           "check", "check_resumable", "resumable_values", "MAX_BATCH_SIZE", "positive_int", "non_negative_int", "finite_float", "epoch_list",
           "DEFAULT_LR", "ARCHS"]
