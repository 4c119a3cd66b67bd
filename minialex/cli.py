"""The `minialex` command: argument parsing only; the work is in train.py, evaluation.py, calibration.py,
data and interop.

Long options take one dash, as the C AlexNet's did (`-batchsize 8`); two dashes work too
(`--batchsize 8`, `--load-pretrained W`). Every user error -- a bad list, image, checkpoint or
argument -- is one line on stderr, `minialex: error: ...`, and exit status 2; Ctrl-C saves and exits
130, SIGTERM 143 (128 + the signal number, what shells report for a killed process).

Only the standard library (and config.py, which imports nothing else) is loaded at the top, so
`minialex -h` answers at once, without importing NumPy or Numba; each command imports what it uses.
The train command's options are generated from TrainConfig (config.py), their one description.
"""
import argparse
import os
import sys

from .config import ARCHS, TrainConfig, add_option, add_train_options, check, non_negative_int, options, positive_int
from .errors import MinialexError

EXIT_USER_ERROR = 2
EXIT_BROKEN_PIPE = 128 + 13   # what a shell reports for a tool SIGPIPE ended


class UsageError(MinialexError):
    """A bad command line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # argparse's own error prints the usage block too; we promise one line.
        raise UsageError(f"{message} (see '{self.prog} -h')")

    def _get_option_tuples(self, option_string):
        # No prefix matching, also for single-dash options, where allow_abbrev=False does not reach
        # on every Python: -batch must not be taken for -batchsize.
        return []


def _train_parser(sub):
    p = sub.add_parser("train", help="train AlexNet on a list of images",
                       description="Train AlexNet on a list file of 'class_id image_path' lines. Saves a "
                                   "checkpoint after every epoch and on Ctrl-C (exit 130) or SIGTERM (exit 143).")
    add_train_options(p)
    p.set_defaults(run=_run_train)


def _run_train(a):
    from .train import Interrupted, run_training
    cfg = TrainConfig(**{f.name: getattr(a, f.name) for f, meta in options() if meta["cli"]})
    check(cfg)  # a bad combination of options fails before anything is loaded
    try:
        run_training(cfg)
    except Interrupted as e:   # every process stopped at the same batch; rank 0 says so
        from .progress import say
        say(str(e))
        return e.exit_code
    return 0


def _inference_parser(sub):
    p = sub.add_parser("inference", help="top-k classes of images",
                       description="Print the top-k classes (softmax probabilities) of each image, using the "
                                   "checkpoint's class names, resize, crop and normalisation.")
    add_option(p, "input", nargs="+", required=True, metavar="IMG", help="one or more images, any size or mode")
    add_option(p, "load", required=True, metavar="W", help="checkpoint written by minialex train")
    add_option(p, "topk", type=positive_int, default=5, metavar="K", help="classes to show (default 5)")
    add_option(p, "threads", type=positive_int, metavar="T", help="compute threads")
    p.set_defaults(run=_run_inference)


def _run_inference(a):
    from . import progress
    from .evaluation import format_predictions, predict
    results = predict(a.input, a.load, topk=a.topk, threads=a.threads)
    if progress.speaking:
        print(format_predictions(results))
    return 0


def _eval_parser(sub):
    p = sub.add_parser("eval", help="accuracy and confusion matrix on a list",
                       description="Top-1/top-5 accuracy of a checkpoint on a list file, and a confusion matrix.")
    add_option(p, "list", required=True, metavar="F", help="list of 'class_id image_path' lines")
    add_option(p, "load", required=True, metavar="W", help="checkpoint written by minialex train")
    add_option(p, "batchsize", type=positive_int, default=32, metavar="N", help="default 32")
    add_option(p, "workers", type=non_negative_int, default=2, metavar="N", help="image decoding threads (default 2)")
    add_option(p, "threads", type=positive_int, metavar="T", help="compute threads")
    add_option(p, "plot", metavar="F.png", help="also draw the confusion matrix (needs matplotlib)")
    p.set_defaults(run=_run_eval)


def _run_eval(a):
    from .errors import printable
    from .evaluation import format_confusion, run_eval
    if a.plot:
        from .plot import require_matplotlib
        require_matplotlib()
    from . import progress
    ckpt, r = run_eval(a.list, a.load, batch_size=a.batchsize, workers=a.workers, threads=a.threads)
    if not progress.speaking:   # another process of a data-parallel eval reports
        return 0
    print(f"{printable(a.list, 300)}: {r['n']} images  top-1 {r['top1']:.2%}  top-5 {r['top5']:.2%}  loss {r['loss']:.4f}")
    print(format_confusion(r["confusion"], ckpt.class_names))
    if a.plot:
        from .plot import plot_confusion
        plot_confusion(r["confusion"], ckpt.class_names, a.plot)
    return 0


def _quantize_parser(sub):
    p = sub.add_parser("quantize", help="float checkpoint -> int8 checkpoint (post-training quantisation)",
                       description="Calibrate activation scales on sample images (the eval preprocessing), "
                                   "try the max, percentile, mse and entropy criteria, keep the one whose int8 "
                                   "model agrees best with the float model, and save an int8 checkpoint that "
                                   "inference and eval take like a float one.")
    add_option(p, "load", required=True, metavar="W", help="float checkpoint")
    add_option(p, "calib", metavar="F", help="list of 'class_id image_path' lines to calibrate on (default: "
                                             "the training list the checkpoint records, if it records one)")
    add_option(p, "save", required=True, metavar="W8", help="int8 checkpoint to write")
    add_option(p, "criterion", choices=("auto", "max", "percentile", "mse", "entropy"), default="auto",
               help="activation threshold criterion (default auto: try all, keep the best)")
    add_option(p, "images", type=positive_int, default=256, metavar="N",
               help="calibration images drawn from the list (default 256)")
    add_option(p, "seed", type=non_negative_int, default=0, metavar="S", help="seed of that draw (default 0)")
    add_option(p, "batchsize", type=positive_int, default=32, metavar="N", help="default 32")
    add_option(p, "workers", type=non_negative_int, default=2, metavar="N", help="image decoding threads (default 2)")
    add_option(p, "threads", type=positive_int, metavar="T", help="compute threads")
    p.set_defaults(run=_run_quantize)


def _run_quantize(a):
    from .calibration import format_calibration, run_quantize
    from .errors import printable
    from .progress import say
    result = run_quantize(a.load, a.save, calib=a.calib, criterion=a.criterion, images=a.images, seed=a.seed,
                          threads=a.threads, batch_size=a.batchsize, workers=a.workers, say=say)
    print(format_calibration(result))
    print(printable(f"wrote {a.save} (int8, {result.best.criterion} calibration)", None))
    return 0


def _summary_parser(sub):
    p = sub.add_parser("summary", help="layer table of a model",
                       description="Print each layer's output shape, parameters and multiply-adds, and the "
                                   "path each convolution takes forward and backward (from the routing table).")
    add_option(p, "arch", choices=ARCHS, default="torchvision", help="default torchvision")
    add_option(p, "bn", action="store_true", help="with batch normalisation")
    add_option(p, "classes", type=positive_int, default=1000, metavar="N", help="number of classes (default 1000)")
    add_option(p, "batch", type=positive_int, default=1, metavar="N", help="batch size the paths are chosen for (default 1)")
    add_option(p, "threads", type=positive_int, metavar="T", help="compute threads (default: all)")
    add_option(p, "precision", choices=("fp32", "bf16"), default="fp32",
               help="arithmetic of the convolution and linear layers (as train -precision)")
    p.set_defaults(run=_run_summary)


def _run_summary(a):
    from . import models
    model = models.alexnet(num_classes=a.classes, variant=a.arch, batch_norm=a.bn).to_precision(a.precision)
    size = models.INPUT_SIZE[a.arch]
    models.summary(model, (a.batch, 3, size, size), threads=a.threads)
    return 0


def _prepare_parser(sub):
    p = sub.add_parser("prepare", help="turn a dataset into images + list files",
                       description="Write a dataset out as image files with train/test list files and a labels file.")
    kinds = p.add_subparsers(dest="kind", metavar="KIND", parser_class=_Parser)
    kinds.required = True
    f = kinds.add_parser("fashion-mnist", help="Fashion-MNIST from its IDX .gz files",
                         description="Write Fashion-MNIST (60000 train / 10000 test) as PNGs with list files.")
    f.add_argument("out_dir", metavar="OUT_DIR")
    add_option(f, "source", metavar="DIR", help="folder of the IDX .gz files (default: Debian's "
                                          "/usr/share/datasets/fashion-mnist)")
    f.set_defaults(run=_run_prepare_fashion)
    d = kinds.add_parser("folder", help="a folder with one sub-folder of images per class",
                         description="List a folder of class sub-folders (SRC/<class>/<image>) as a dataset.")
    d.add_argument("src", metavar="SRC")
    d.add_argument("out_dir", metavar="OUT_DIR")
    d.set_defaults(run=_run_prepare_folder)


def _run_prepare_fashion(a):
    from .data import prepare
    kwargs = {"source": a.source} if a.source else {}
    _report_prepared(prepare.prepare_fashion_mnist(a.out_dir, **kwargs))
    return 0


def _run_prepare_folder(a):
    from .data import prepare
    _report_prepared(prepare.prepare_folder(a.src, a.out_dir))
    return 0


def _report_prepared(out_dir):
    train, test = os.path.join(out_dir, "train", "images.list"), os.path.join(out_dir, "test", "images.list")
    labels = os.path.join(out_dir, "labels.txt")
    print(f"wrote {train}, {test} and {labels}")
    print(f"train with: minialex train -list {train} -val {test} -labels {labels}")


def build_parser():
    parser = _Parser(prog="minialex", allow_abbrev=False,
                     description="AlexNet on the CPU, from scratch in NumPy and Numba.",
                     epilog="Run 'minialex COMMAND -h' for a command's options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for add in (_train_parser, _inference_parser, _eval_parser, _quantize_parser, _summary_parser,
                _prepare_parser):
        add(sub)
    from .interop import register as add_interop_commands  # convert, export, compare (stdlib-only import)
    add_interop_commands(sub)
    for p in sub.choices.values():
        p.allow_abbrev = False
    return parser


def main(argv=None):
    # Compiled kernels are cached beside the package; where that folder is read-only Numba
    # falls back to a per-user cache folder by itself.
    try:
        args = build_parser().parse_args(argv)
        code = args.run(args)
        sys.stdout.flush()   # a reader that went away shows here, not in the interpreter's exit
        return code
    except BrokenPipeError:
        # whoever reads stdout stopped early (`| head`): stop quietly, as other command-line tools
        # do, with the status a shell gives a tool that SIGPIPE ended
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except MinialexError as e:
        return _fail(f"minialex: error: {e}", EXIT_USER_ERROR, e)
    except KeyboardInterrupt:
        return _fail("minialex: interrupted", 130)
    except MemoryError:
        return _fail("minialex: error: out of memory (try a smaller -batchsize, or fewer -workers)",
                     EXIT_USER_ERROR)
    except OSError as e:
        # Files the user named that vanished or cannot be read/written outside our own checks.
        where = f"{e.filename}: " if e.filename else ""
        return _fail(f"minialex: error: {where}{e.strerror or e}", EXIT_USER_ERROR)
    except Exception:
        world = _running_world()
        if world is None:
            raise
        import traceback
        traceback.print_exc()
        _fail(f"minialex: error: rank {world.rank}: {sys.exc_info()[0].__name__} (traceback above)", 1)


def _running_world():
    """The World of a data-parallel run in progress, or None (never imports MPI itself)."""
    distributed = sys.modules.get("minialex.distributed")
    world = getattr(distributed, "_world", None)
    return world if world is not None and world.distributed else None


def _fail(line, code, error=None):
    """Print `line`, exit with `code`. In a data-parallel run an error every process met alike is
    printed once (by the process that owns it); any other ends the whole job (MPI_Abort), since
    the other processes would wait for this one forever."""
    world = _running_world()
    if world is None:
        print(line, file=sys.stderr)
        return code
    from .distributed import ReportedElsewhere
    if isinstance(error, ReportedElsewhere):
        return code
    if getattr(error, "collective", False):
        print(line, file=sys.stderr, flush=True)
        return code
    print(line.replace("minialex: error: ", f"minialex: error: rank {world.rank}: ", 1), file=sys.stderr,
          flush=True)
    world.abort(code)


if __name__ == "__main__":
    sys.exit(main())
