"""Data-parallel training through the real command line: `mpiexec -n 2 python -m minialex train ...`.

Each test starts an MPI job in a subprocess with a timeout (MPICH runs as root and oversubscribes
without flags). They skip where mpi4py or mpiexec is missing.
"""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from minialex.checkpoint import load_checkpoint
from minialex.data import demo_dataset, read_list

from helpers import cli_env, write_list

pytest.importorskip("mpi4py", reason="data-parallel training needs mpi4py (pip install 'minialex[mpi]')")
# The mpich wheel puts mpiexec beside the interpreter, which need not be on PATH.
MPIEXEC = shutil.which("mpiexec") or shutil.which("mpiexec", path=os.path.dirname(sys.executable))
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec on PATH (pip install mpich)")

COMMON = ["-arch", "cifar", "-workers", "0", "-seed", "3"]


def mpi(n, args, cwd, timeout=240):
    """`mpiexec -n N python -m minialex ARGS` (N = 0: no mpiexec, one plain process)."""
    command = [sys.executable, "-m", "minialex", *map(str, args)]
    if n:
        command = [MPIEXEC, "-n", str(n), *command]
    return subprocess.run(command, cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=timeout)


def start(n, args, cwd):
    return subprocess.Popen([MPIEXEC, "-n", str(n), sys.executable, "-m", "minialex", *map(str, args)],
                            cwd=cwd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def samples():
    return read_list(demo_dataset().train_list)


def weights(path):
    return load_checkpoint(path).state_dict


def assert_close(a, b, rtol=1e-5):
    for key in a:
        scale = max(float(np.abs(a[key]).max()), 1e-12)
        assert float(np.abs(a[key].astype(np.float64) - b[key]).max()) <= rtol * scale, key


def one_error_line(r):
    lines = [line for line in r.stderr.splitlines() if line.startswith("minialex: error:")]
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.mark.parametrize("extra, images", [([], 24), (["-bn", "-sync_bn"], 24), (["-bn", "-sync_bn"], 17)],
                         ids=["dropout", "sync_bn", "sync_bn_empty_share"])
def test_two_processes_of_batch_4_equal_one_of_batch_8(samples, tmp_path, extra, images):
    """3 steps of global batch 8: the same weights within float32 summation order. With 17 images
    the last global batch is one image, so rank 1's share is empty and still takes part."""
    data = write_list(tmp_path / "l.list", samples[:images])
    base = ["train", "-list", data, "-epochs", 1, *COMMON, *extra]
    one = mpi(0, [*base, "-batchsize", 8, "-threads", 1, "-save", "one.npz"], tmp_path)
    two = mpi(2, [*base, "-batchsize", 4, "-save", "two.npz"], tmp_path)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr + two.stdout
    assert "data-parallel: 2 processes (2 on this node), 1 threads each, batch 4 per process, " \
           "global batch 8" in two.stderr
    assert two.stdout.count("epoch 1/1") == 1 and "all-reduce" in two.stdout   # rank 0 alone reports
    assert_close(weights(tmp_path / "one.npz"), weights(tmp_path / "two.npz"))


def test_checkpoint_of_two_processes_resumes_on_one_and_on_two(samples, tmp_path):
    data = write_list(tmp_path / "l.list", samples[:16])
    r = mpi(2, ["train", "-list", data, "-epochs", 1, "-batchsize", 4, "-save", "two.npz", *COMMON], tmp_path)
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(tmp_path / "two.npz").train_state["world_size"] == 2
    shutil.copy(tmp_path / "two.npz", tmp_path / "again.npz")
    on_one = mpi(0, ["train", "-list", data, "-epochs", 2, "-resume", "two.npz", "-threads", 1, *COMMON],
                 tmp_path)
    assert on_one.returncode == 0, on_one.stderr
    assert "two.npz was trained by 2 processes, this run has 1: the global batch changes from 8 to 4" \
        in on_one.stderr
    assert load_checkpoint(tmp_path / "two.npz").train_state["epoch"] == 2
    on_two = mpi(2, ["train", "-list", data, "-epochs", 2, "-resume", "again.npz", *COMMON], tmp_path)
    assert on_two.returncode == 0, on_two.stderr
    assert load_checkpoint(tmp_path / "again.npz").train_state["world_size"] == 2


def test_resuming_on_another_process_count_says_the_global_batch_changes(samples, tmp_path):
    data = write_list(tmp_path / "l.list", samples[:16])
    r = mpi(0, ["train", "-list", data, "-epochs", 1, "-batchsize", 4, "-threads", 1, "-save", "one.npz",
                *COMMON], tmp_path)
    assert r.returncode == 0, r.stderr
    r = mpi(2, ["train", "-list", data, "-epochs", 2, "-resume", "one.npz", *COMMON], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "one.npz was trained by 1 processes, this run has 2: the global batch changes from 4 to 8" in r.stderr


def test_a_bad_image_in_rank_1s_shard_is_one_line_exit_2(samples, tmp_path):
    chosen = samples[:16]
    # Epoch 1's order with seed 3; the first global batch of 8 gives rank 1 its positions 4..7.
    order = np.random.default_rng([3, 1]).permutation(len(chosen))
    victim = int(order[5])
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    lines = [f"{s.label} {s.path}" for s in chosen]
    lines[victim] = f"{chosen[victim].label} {tmp_path / 'broken.png'}"
    (tmp_path / "l.list").write_text("\n".join(lines) + "\n")
    r = mpi(2, ["train", "-list", "l.list", "-epochs", 1, "-batchsize", 4, *COMMON], tmp_path)
    assert r.returncode == 2, r.stderr
    line = one_error_line(r)
    assert f"l.list:{victim + 1}:" in line and "broken.png" in line, line
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "alexnet.npz").exists()


def test_lists_that_differ_between_processes_are_refused(samples, tmp_path):
    write_list(tmp_path / "a.list", samples[:16])
    write_list(tmp_path / "b.list", samples[:15])
    command = [sys.executable, "-m", "minialex", "train", "-epochs", 1, "-batchsize", 4, *COMMON]
    r = subprocess.run([MPIEXEC, "-n", "1", *map(str, command), "-list", "a.list", ":",
                        "-n", "1", *map(str, command), "-list", "b.list"],
                       cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 2, r.stderr
    line = one_error_line(r)
    assert "the training list" in line and "differs between processes: rank 1" in line, line


def _wait_for(path, proc, seconds=180):
    deadline = time.monotonic() + seconds
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.2)


def _rank_pid(rank, marker):
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if marker.encode() in cmd and f"PMI_RANK={rank}".encode() in env and b"minialex" in cmd \
                and not cmd.startswith(MPIEXEC.encode()):
            return int(pid)
    raise AssertionError(f"no process of rank {rank}")


def test_a_killed_rank_ends_the_job_and_leaves_the_checkpoint_loadable(samples, tmp_path):
    data = write_list(tmp_path / "kill.list", samples[:64])
    proc = start(2, ["train", "-list", data, "-epochs", 200, "-batchsize", 4, "-save", "w.npz", *COMMON],
                 tmp_path)
    try:
        _wait_for(tmp_path / "w.npz", proc)
        os.kill(_rank_pid(1, str(data)), signal.SIGKILL)
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=60)
        assert time.monotonic() - t0 < 60
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "KILLED BY SIGNAL: 9" in out + err or "signal 9" in out + err, out + err
    assert "ranks: 0=pid" in err   # which PID was which rank, for the launcher's report
    assert load_checkpoint(tmp_path / "w.npz").train_state["epoch"] >= 1


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_to_mpiexec_saves_at_one_batch_and_exits_128_plus_it(samples, tmp_path, signum, code):
    data = write_list(tmp_path / "sig.list", samples[:64])
    proc = start(2, ["train", "-list", data, "-epochs", 200, "-batchsize", 4, "-save", "w.npz", *COMMON],
                 tmp_path)
    try:
        _wait_for(tmp_path / "w.npz", proc)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    name = signal.Signals(signum).name
    assert err.count(f"minialex: {name} ") == 1, err     # rank 0 alone reports
    state = load_checkpoint(tmp_path / "w.npz").train_state
    assert state["world_size"] == 2


def test_bf16_gradient_transport_stays_close_to_float32(samples, tmp_path):
    """-grad_dtype bf16: gradients travel at half the bytes with error feedback. After 3 steps the
    weights stay within 0.5% (of each tensor's largest weight) of one float32 process's: bf16 keeps
    8 bits of each gradient (the all-reduce's own error is 0.4% of the largest gradient) and a few
    ReLUs flip on the way. They do differ by more than float32's summation order (1e-5)."""
    data = write_list(tmp_path / "l.list", samples[:24])
    base = ["train", "-list", data, "-epochs", 1, *COMMON]
    one = mpi(0, [*base, "-batchsize", 8, "-threads", 1, "-save", "one.npz"], tmp_path)
    two = mpi(2, [*base, "-batchsize", 4, "-grad_dtype", "bf16", "-save", "two.npz"], tmp_path)
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert "gradients sent as bf16" in two.stderr
    a, b = weights(tmp_path / "one.npz"), weights(tmp_path / "two.npz")
    assert_close(a, b, rtol=5e-3)
    with pytest.raises(AssertionError):
        assert_close(a, b, rtol=1e-5)


def test_eval_and_validation_are_sharded_and_summed(samples, tmp_path):
    """`mpiexec -n 2 minialex eval` prints once what one process prints; validation during a
    2-process run reports what one process's run reports."""
    data = write_list(tmp_path / "l.list", samples[:16])
    val = write_list(tmp_path / "v.list", samples[16:27])   # 11 images: shares of 6 and 5
    one = mpi(0, ["train", "-list", data, "-val", val, "-epochs", 1, "-batchsize", 8, "-threads", 1,
                  "-save", "one.npz", "-log", "one.jsonl", *COMMON], tmp_path)
    two = mpi(2, ["train", "-list", data, "-val", val, "-epochs", 1, "-batchsize", 4, "-save", "two.npz",
                  "-log", "two.jsonl", *COMMON], tmp_path)
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    import json
    a = json.loads((tmp_path / "one.jsonl").read_text())
    b = json.loads((tmp_path / "two.jsonl").read_text())
    assert a["val_top1"] == b["val_top1"] and a["val_top5"] == b["val_top5"]
    assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4)
    e1 = mpi(0, ["eval", "-list", val, "-load", "one.npz", "-batchsize", 4, "-workers", 0, "-threads", 1], tmp_path)
    e2 = mpi(2, ["eval", "-list", val, "-load", "one.npz", "-batchsize", 2, "-workers", 0], tmp_path)
    assert e1.returncode == 0 and e2.returncode == 0, e2.stderr
    first = e1.stdout.splitlines()[0]
    assert "11 images" in first
    assert e2.stdout.count("11 images") == 1                    # rank 0 alone prints
    assert e2.stdout.splitlines()[0].split("loss")[0] == first.split("loss")[0]   # counts and accuracies
    assert e2.stdout.splitlines()[1:] == e1.stdout.splitlines()[1:]               # the confusion matrix
    # an int8 checkpoint is evaluated the same way: the same counts and matrix on 1 and 2 processes
    q = mpi(0, ["quantize", "-load", "one.npz", "-calib", data, "-save", "one8.npz", "-images", 8,
                "-criterion", "max", "-workers", 0, "-threads", 1], tmp_path)
    assert q.returncode == 0, q.stderr
    e1 = mpi(0, ["eval", "-list", val, "-load", "one8.npz", "-batchsize", 4, "-workers", 0, "-threads", 1], tmp_path)
    e2 = mpi(2, ["eval", "-list", val, "-load", "one8.npz", "-batchsize", 2, "-workers", 0], tmp_path)
    assert e1.returncode == 0 and e2.returncode == 0, e2.stderr
    assert e2.stdout.count("11 images") == 1
    assert e2.stdout.splitlines()[0].split("loss")[0] == e1.stdout.splitlines()[0].split("loss")[0]
    assert e2.stdout.splitlines()[1:] == e1.stdout.splitlines()[1:]
