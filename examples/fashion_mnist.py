"""Train the small (cifar) AlexNet on the full Fashion-MNIST and report test accuracy per epoch.

    python examples/fashion_mnist.py                      # prepare (once), train 10 epochs, evaluate
    python examples/fashion_mnist.py -smoke               # a few batches, to check a setup works
    python examples/fashion_mnist.py -precision bf16      # the same in bfloat16 arithmetic

Data: the 60000/10000 IDX files (Debian's dataset-fashion-mnist package installs them in
/usr/share/datasets/fashion-mnist; -source picks another folder) are written out once as PNGs with
list files (`minialex prepare fashion-mnist`). The grey 28x28 images are read as RGB (grey copied to
three channels) and resized to 32x32 (-resize 36 gives random 32x32 crops of 36x36 instead); training
adds random flips.

Recipe (target: >= 92% top-1 within 10 epochs): batch normalisation after every convolution, so a
high rate is stable from the first batch; SGD with momentum 0.9, lr 0.05, weight decay 5e-4, batch
128, the rate divided by 10 after epochs 6 and 9; images resized to 32x32 with random flips as the
only augmentation and no dropout. Heavier regularisation underfits in 10 epochs: random 32x32 crops
of 36x36 with dropout 0.5 ended at 90.8% top-1, with dropout 0.25 at 90.8% after 8 epochs, train
and test accuracy equal in both.
The test set is evaluated after every epoch (top-1, top-5), and each epoch's line reports its time.
"""
import argparse
import os
import sys
import time

from minialex.data import prepare_fashion_mnist
from minialex.data.prepare import FASHION_MNIST_SOURCE
from minialex.errors import MinialexError
from minialex.train import Interrupted, TrainConfig, run_training


def prepared(out_dir, source):
    """(train list, test list, labels) of the PNG copy, writing it first if it is not there yet."""
    paths = (os.path.join(out_dir, "train", "images.list"), os.path.join(out_dir, "test", "images.list"),
             os.path.join(out_dir, "labels.txt"))
    if not all(os.path.exists(p) for p in paths):
        start = time.perf_counter()
        print(f"writing Fashion-MNIST from {source} as PNGs to {out_dir} (once) ...", flush=True)
        prepare_fashion_mnist(out_dir, source=source)
        print(f"done in {time.perf_counter() - start:.0f}s", flush=True)
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prefix_chars="-")
    p.add_argument("-data", "--data", default="fashion-mnist-png", help="folder for the PNG copy")
    p.add_argument("-source", "--source", default=FASHION_MNIST_SOURCE, help="folder of the IDX .gz files")
    p.add_argument("-epochs", "--epochs", type=int, default=10)
    p.add_argument("-batchsize", "--batchsize", type=int, default=128)
    p.add_argument("-lr", "--lr", type=float, default=0.05)
    p.add_argument("-dropout", "--dropout", type=float, default=0.0)
    p.add_argument("-resize", "--resize", type=int, default=32,
                   help="shorter side before the 32x32 crop (32: flips are the only augmentation)")
    p.add_argument("-milestones", "--milestones", default="6,9", help="epochs where the rate is divided by 10")
    p.add_argument("-precision", "--precision", choices=("fp32", "bf16"), default="fp32",
                   help="arithmetic of the convolution and linear layers (train -precision)")
    p.add_argument("-seed", "--seed", type=int, default=0, help="initialisation, shuffling and augmentation")
    p.add_argument("-threads", "--threads", type=int, default=None)
    p.add_argument("-workers", "--workers", type=int, default=2)
    p.add_argument("-save", "--save", default="fashion_mnist_alexnet.npz")
    p.add_argument("-log", "--log", default=None, help="append one JSON line per epoch here")
    p.add_argument("-smoke", "--smoke", action="store_true", help="5 batches of one epoch only")
    args = p.parse_args(argv)

    try:
        train_list, test_list, labels = prepared(args.data, args.source)
        epochs = 1 if args.smoke else args.epochs
        cfg = TrainConfig(list_path=train_list, val_path=test_list, labels_path=labels, arch="cifar",
                          batch_norm=True, dropout=args.dropout, resize=args.resize, optimizer="sgd", lr=args.lr, momentum=0.9,
                          weight_decay=5e-4, schedule="multistep",
                          milestones=[int(m) for m in args.milestones.split(",")], gamma=0.1, batch_size=args.batchsize,
                          epochs=epochs, seed=args.seed, threads=args.threads, workers=args.workers,
                          precision=args.precision,
                          save=args.save, log=args.log, max_batches=5 if args.smoke else None)
        state = run_training(cfg)
    except MinialexError as e:
        print(f"fashion_mnist: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"fashion_mnist: {e}", file=sys.stderr)
        return e.exit_code

    print("\nepoch  test top-1  test top-5  seconds")
    for r in state["history"]:
        print(f"{r['epoch']:>5}  {r['val_top1']:>9.2%}  {r['val_top5']:>9.2%}  {r['time']:>7.1f}")
    best = max(r["val_top1"] for r in state["history"])
    print(f"best test top-1: {best:.2%} (target 92%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
