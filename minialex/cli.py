"""The `minialex` command: argument parsing only; the work is in train.py, checkpoint.py and data.

Long options take one dash, as the C AlexNet's did (`-batchsize 8`); two dashes work too
(`--batchsize 8`, `--load-pretrained W`). Every user error -- a bad list, image, checkpoint or
argument -- is one line on stderr, `minialex: error: ...`, and exit status 2; Ctrl-C saves and exits
130, SIGTERM 143 (128 + the signal number, what shells report for a killed process).

Only the standard library is imported at the top: `minialex -h` should answer at once, and the
Numba cache folder must be settled before anything imports Numba.
"""
import argparse
import os
import sys

from .errors import MinialexError

EXIT_USER_ERROR = 2


class UsageError(MinialexError):
    """A bad command line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # argparse's own error prints the usage block too; we promise one line.
        raise UsageError(f"{message} (see '{self.prog} -h')")


def _opt(parser, name, **kw):
    """Register -name, --name and (for names with underscores) --name-with-dashes."""
    spellings = [f"-{name}", f"--{name}"]
    if "_" in name:
        spellings.append(f"--{name.replace('_', '-')}")
    parser.add_argument(*spellings, dest=name, **kw)


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def _milestones(text):
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give epochs as integers, e.g. 5,8") from None


def _train_parser(sub):
    p = sub.add_parser("train", help="train AlexNet on a list of images",
                       description="Train AlexNet on a list file of 'class_id image_path' lines. Saves a "
                                   "checkpoint after every epoch and on Ctrl-C (exit 130) or SIGTERM (exit 143).")
    _opt(p, "list", metavar="F", help="training list (default: ./images.list if it exists, else the "
                                       "built-in Fashion-MNIST demo data, with its test list as -val)")
    _opt(p, "val", metavar="F", help="validation list, evaluated after every epoch")
    _opt(p, "labels", metavar="F", help="labels file of 'class_id name' lines (default: names class_<id>)")
    _opt(p, "batchsize", type=_positive_int, metavar="N", help="images per batch (default 32)")
    _opt(p, "epochs", type=_positive_int, metavar="N", help="total epochs, counting resumed ones (default 10)")
    _opt(p, "arch", choices=["torchvision", "paper", "cifar"],
         help="AlexNet variant (default: cifar on the demo data, torchvision otherwise)")
    _opt(p, "bn", action="store_true", default=None, help="batch normalisation after each convolution")
    _opt(p, "dropout", type=float, metavar="P", help="dropout probability of the classifier (default 0.5)")
    _opt(p, "optimizer", choices=["sgd", "adam"], help="default sgd")
    _opt(p, "lr", type=float, metavar="LR", help="learning rate (default 0.01 for sgd, 0.001 for adam)")
    _opt(p, "momentum", type=float, metavar="M", help="SGD momentum (default 0.9)")
    _opt(p, "wd", type=float, metavar="WD", help="weight decay (default 5e-4)")
    _opt(p, "schedule", choices=["none", "step", "multistep", "plateau"],
         help="learning-rate schedule: step divides by 10 every -step_size epochs (default a third of "
              "the epochs), multistep at each of -milestones, plateau when validation loss stalls 2 "
              "epochs (default none)")
    _opt(p, "step_size", type=_positive_int, metavar="N", help="epochs between steps of -schedule step")
    _opt(p, "milestones", type=_milestones, metavar="E,E", help="epochs where -schedule multistep divides")
    _opt(p, "gamma", type=float, metavar="G", help="factor of each learning-rate step (default 0.1)")
    _opt(p, "label_smoothing", type=float, metavar="S", help="label smoothing (default 0)")
    _opt(p, "pca", action="store_true", default=None, help="the paper's PCA colour augmentation")
    _opt(p, "load_pretrained", metavar="W", help="start from these weights (a checkpoint or an .npz "
                                                  "state_dict); another class count re-initialises the last layer")
    _opt(p, "resume", metavar="CKPT", help="continue a run from its checkpoint: model, optimiser, schedule, "
                                           "epoch and random state (hyper-parameters come from it)")
    _opt(p, "save", metavar="W", help="checkpoint file, rewritten atomically every epoch "
                                      "(default: alexnet.npz in the current folder; the -resume file when resuming)")
    _opt(p, "seed", type=int, metavar="S", help="random seed (default 0)")
    _opt(p, "threads", type=_positive_int, metavar="T", help="compute threads (numba.set_num_threads)")
    _opt(p, "workers", type=int, default=2, metavar="N", help="image decoding threads (default 2; 0 decodes inline)")
    _opt(p, "skip_bad", action="store_true", help="skip unreadable images with a warning instead of stopping")
    _opt(p, "log", metavar="F.jsonl", help="append one JSON object per epoch to this file")
    _opt(p, "plot", metavar="F.png", help="draw loss/accuracy curves after every epoch (needs matplotlib)")
    p.set_defaults(run=_run_train)


def _run_train(a):
    from .train import Interrupted, TrainConfig, run_training
    cfg = TrainConfig(
        list_path=a.list, val_path=a.val, labels_path=a.labels, epochs=a.epochs, batch_size=a.batchsize,
        arch=a.arch, batch_norm=a.bn, dropout=a.dropout, optimizer=a.optimizer, lr=a.lr,
        momentum=a.momentum, weight_decay=a.wd, schedule=a.schedule, step_size=a.step_size,
        milestones=a.milestones or [], gamma=a.gamma, label_smoothing=a.label_smoothing, pca=a.pca,
        load_pretrained=a.load_pretrained, resume=a.resume, save=a.save, seed=a.seed, threads=a.threads,
        workers=a.workers, skip_bad_images=a.skip_bad, log=a.log, plot=a.plot)
    if cfg.schedule == "multistep" and not cfg.milestones and not cfg.resume:
        raise UsageError("minialex train: -schedule multistep needs -milestones, e.g. -milestones 5,8")
    if cfg.resume and cfg.load_pretrained:
        raise UsageError("minialex train: give -resume (continue a run) or -load_pretrained (start a new "
                         "one from weights), not both")
    if cfg.workers < 0:
        raise UsageError("minialex train: -workers must be 0 or more")
    try:
        run_training(cfg)
    except Interrupted as e:
        print(f"minialex: {e}", file=sys.stderr)
        return e.exit_code
    return 0


def _inference_parser(sub):
    p = sub.add_parser("inference", help="top-k classes of images",
                       description="Print the top-k classes (softmax probabilities) of each image, using the "
                                   "checkpoint's class names, resize, crop and normalisation.")
    _opt(p, "input", nargs="+", required=True, metavar="IMG", help="one or more images, any size or mode")
    _opt(p, "load", required=True, metavar="W", help="checkpoint written by minialex train")
    _opt(p, "topk", type=_positive_int, default=5, metavar="K", help="classes to show (default 5)")
    _opt(p, "threads", type=_positive_int, metavar="T", help="compute threads")
    p.set_defaults(run=_run_inference)


def _run_inference(a):
    from .train import predict
    for path, top in predict(a.input, a.load, topk=a.topk, threads=a.threads):
        print(path)
        for class_id, name, prob in top:
            print(f"  {prob:8.2%}  {name} ({class_id})")
    return 0


def _eval_parser(sub):
    p = sub.add_parser("eval", help="accuracy and confusion matrix on a list",
                       description="Top-1/top-5 accuracy of a checkpoint on a list file, and a confusion matrix.")
    _opt(p, "list", required=True, metavar="F", help="list of 'class_id image_path' lines")
    _opt(p, "load", required=True, metavar="W", help="checkpoint written by minialex train")
    _opt(p, "batchsize", type=_positive_int, default=32, metavar="N", help="default 32")
    _opt(p, "workers", type=int, default=2, metavar="N", help="image decoding threads (default 2)")
    _opt(p, "threads", type=_positive_int, metavar="T", help="compute threads")
    _opt(p, "plot", metavar="F.png", help="also draw the confusion matrix (needs matplotlib)")
    p.set_defaults(run=_run_eval)


def _run_eval(a):
    from .train import format_confusion, run_eval
    if a.plot:
        from .plot import require_matplotlib
        require_matplotlib()
    ckpt, r = run_eval(a.list, a.load, batch_size=a.batchsize, workers=max(0, a.workers), threads=a.threads)
    print(f"{a.list}: {r['n']} images  top-1 {r['top1']:.2%}  top-5 {r['top5']:.2%}  loss {r['loss']:.4f}")
    print(format_confusion(r["confusion"], ckpt.class_names))
    if a.plot:
        from .plot import plot_confusion
        plot_confusion(r["confusion"], ckpt.class_names, a.plot)
    return 0


def _summary_parser(sub):
    p = sub.add_parser("summary", help="layer table of a model",
                       description="Print each layer's output shape, parameters and multiply-adds.")
    _opt(p, "arch", choices=["torchvision", "paper", "cifar"], default="torchvision", help="default torchvision")
    _opt(p, "bn", action="store_true", help="with batch normalisation")
    _opt(p, "classes", type=_positive_int, default=1000, metavar="N", help="number of classes (default 1000)")
    p.set_defaults(run=_run_summary)


def _run_summary(a):
    from . import models
    model = models.alexnet(num_classes=a.classes, variant=a.arch, batch_norm=a.bn)
    size = models.INPUT_SIZE[a.arch]
    models.summary(model, (1, 3, size, size))
    return 0


def _prepare_parser(sub):
    p = sub.add_parser("prepare", help="turn a dataset into images + list files",
                       description="Write a dataset out as image files with train/test list files and a labels file.")
    kinds = p.add_subparsers(dest="kind", metavar="KIND", parser_class=_Parser)
    kinds.required = True
    f = kinds.add_parser("fashion-mnist", help="Fashion-MNIST from its IDX .gz files",
                         description="Write Fashion-MNIST (60000 train / 10000 test) as PNGs with list files.")
    f.add_argument("out_dir", metavar="OUT_DIR")
    _opt(f, "source", metavar="DIR", help="folder of the IDX .gz files (default: Debian's "
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
    for add in (_train_parser, _inference_parser, _eval_parser, _summary_parser, _prepare_parser):
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
        return args.run(args)
    except MinialexError as e:
        print(f"minialex: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("minialex: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("minialex: error: out of memory (try a smaller -batchsize, or fewer -workers)",
              file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as e:
        # Files the user named that vanished or cannot be read/written outside our own checks.
        where = f"{e.filename}: " if e.filename else ""
        print(f"minialex: error: {where}{e.strerror or e}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
