"""Wall time of `python -m minialex inference -input IMG -load W` on one image, start to exit.

Warm: Numba's cache of compiled kernels already filled (one untimed run fills it first) -- what a
user sees every day. Cold: a fresh, empty NUMBA_CACHE_DIR, so every kernel the inference touches
is compiled -- what the first run after installing costs. The checkpoint is a torchvision AlexNet
with ImageNet's 1000 class names, saved with minialex.checkpoint.save_checkpoint by a child
process; the image is a random 320×280 JPEG. A run that exits non-zero or prints no top-5 is
FAILED.
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

from ._common import REPO_ROOT, markdown_table, run_worker, worker_env

TITLE = "Start-up: `python -m minialex inference` on one image"
TOPK = 5


def prepare(folder):
    """Write folder/alexnet.npz and folder/image.jpeg; returns their paths."""
    from importlib import resources

    from PIL import Image

    from minialex import _random, models
    from minialex.checkpoint import save_checkpoint
    text = resources.files("minialex.data").joinpath("imagenet_classes.txt").read_text("utf-8")
    names = [line.strip() for line in text.splitlines() if line.strip()]
    _random.manual_seed(0)
    model = models.alexnet(len(names), "torchvision")
    weights = os.path.join(folder, "alexnet.npz")
    save_checkpoint(weights, model, arch={"variant": "torchvision", "num_classes": len(names), "batch_norm": False,
                                          "input_size": 224, "dropout": 0.5},
                    class_names=names, normalization={"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                                      "resize": 256, "crop": 224})
    image = os.path.join(folder, "image.jpeg")
    pixels = np.random.default_rng(0).integers(0, 256, (280, 320, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image, quality=90)
    return dict(weights=weights, image=image)


def worker(payload):
    return [prepare(payload["folder"])]


def time_inference(paths, threads, cache_dir=None):
    """(seconds, ok, detail) of one `python -m minialex inference` run."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + path if path else "")
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = cache_dir
    cmd = [sys.executable, "-m", "minialex", "inference", "-input", paths["image"], "-load", paths["weights"],
           "-threads", str(threads)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
        return seconds, False, f"exit code {proc.returncode}: {last}"
    shown = re.findall(r"^\s+[0-9.]+%\s", proc.stdout, flags=re.M)
    if len(shown) != TOPK:
        return seconds, False, f"printed {len(shown)} classes, expected the top {TOPK}"
    return seconds, True, None


def run(opts, alternator=None):
    threads = opts.threads
    records, rows, failed = [], [], False
    with tempfile.TemporaryDirectory(prefix="minialex-startup-") as folder:
        env = worker_env("minialex", threads)
        paths = run_worker("benchmarks.run", ["--worker", json.dumps(dict(section="startup", folder=folder))], env)[0]
        time_inference(paths, threads)  # fills the warm cache; its own time is neither warm nor cold
        plans = [("warm", opts.repeats, False), ("cold", 1 if opts.quick else 2, True)]
        for kind, runs, cold in plans:
            times, problems = [], []
            for _ in range(runs):
                if cold:
                    with tempfile.TemporaryDirectory(prefix="numba-cache-", dir=folder) as cache:
                        s, ok, why = time_inference(paths, threads, cache)
                else:
                    s, ok, why = time_inference(paths, threads)
                times.append(s)
                if not ok:
                    problems.append(why)
            med = float(np.median(times))
            status = f"FAILED: {problems[0]}" if problems else "OK"
            failed = failed or bool(problems)
            records.append(dict(kind=kind, runs=runs, median_s=med, best_s=min(times), status=status))
            rows.append([kind, runs, f"{med:.2f}", f"{min(times):.2f}", status])
    table = markdown_table(["JIT cache", "runs", "median s", "best s", "check"], rows)
    return dict(records=records, table=table, failed=failed,
                notes=["a torchvision AlexNet checkpoint (1000 classes); wall time of the whole process"])
