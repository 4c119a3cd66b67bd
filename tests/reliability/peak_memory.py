"""Peak memory of `minialex train` against batch size, for docs/reliability.md.

Not a test (pytest does not collect it): it runs, for each variant and batch size, one epoch of two
batches of demo images in a child process and reads the peak RSS the -log line records.

    python tests/reliability/peak_memory.py [--threads 2]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from minialex.data import demo_dataset, read_list  # noqa: E402


def peak_mb(arch, batch, threads, folder):
    samples = read_list(demo_dataset().train_list)[: 2 * batch]
    lst = os.path.join(folder, f"{arch}{batch}.list")
    with open(lst, "w") as f:
        f.writelines(f"{s.label} {s.path}\n" for s in samples)
    log = os.path.join(folder, f"{arch}{batch}.jsonl")
    env = dict(os.environ, PYTHONPATH=REPO)
    r = subprocess.run([sys.executable, "-m", "minialex", "train", "-list", lst, "-arch", arch, "-batchsize",
                        str(batch), "-epochs", "1", "-threads", str(threads), "-workers", "1", "-save",
                        os.path.join(folder, "w.npz"), "-log", log], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(r.stderr)
    return json.loads(open(log).read().splitlines()[-1])["peak_rss_mb"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=[8, 32, 64])
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        print("| variant | " + " | ".join(f"batch {b}" for b in a.batches) + " |")
        print("|---|" + "---|" * len(a.batches))
        for arch in ("cifar", "torchvision"):
            cells = [f"{peak_mb(arch, b, a.threads, folder):,.0f} MB" for b in a.batches]
            print(f"| {arch} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
