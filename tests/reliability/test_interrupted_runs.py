"""Interrupted runs: SIGKILL at random moments (many during a checkpoint write) never leaves a
checkpoint that does not load, and -resume always continues; SIGINT/SIGTERM, mid-epoch and between
epochs, save and exit 130/143."""
import os
import signal
import time

import numpy as np
import pytest

import minialex.train as train_module
from minialex.checkpoint import load_checkpoint
from minialex.cli import main

from .conftest import FAST, popen_cli, run_cli

KILLS = 22


def _temps(folder):
    return [n for n in os.listdir(folder) if n.startswith(".w.npz.") and n.endswith(".tmp")]


def _kill_when(proc, folder, rng, during_write):
    """SIGKILL proc at a random moment, or just after a checkpoint write has begun."""
    if during_write:
        deadline = time.monotonic() + 20
        while not _temps(folder) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.0005)
        time.sleep(rng.uniform(0, 0.02))
    else:
        time.sleep(rng.uniform(0.2, 2.5))  # from before the first epoch to several epochs in
    proc.kill()
    proc.communicate(timeout=30)


def test_sigkill_at_random_moments_never_breaks_the_newest_checkpoint(demo16, tmp_path):
    warm = run_cli(["train", "-list", demo16[0], "-epochs", 1, "-save", "warm.npz", *FAST], cwd=tmp_path)
    assert warm.returncode == 0, warm.stderr  # compiled kernels are cached before the clock matters
    os.remove(tmp_path / "warm.npz")
    rng = np.random.default_rng(2024)
    epochs, left_mid_write = [], 0
    for i in range(KILLS):
        ckpt = tmp_path / "w.npz"
        start = ["-resume", "w.npz"] if ckpt.exists() else ["-save", "w.npz"]
        proc = popen_cli(["train", "-list", demo16[0], "-epochs", 100000, *start, *FAST], cwd=tmp_path)
        _kill_when(proc, tmp_path, rng, during_write=i % 2 == 1)
        assert proc.returncode == -signal.SIGKILL
        left_mid_write += bool(_temps(tmp_path))
        if ckpt.exists():
            state = load_checkpoint(ckpt).train_state  # the newest checkpoint always loads
            assert not epochs or state["epoch"] >= epochs[-1], "a resumed run went backwards"
            epochs.append(state["epoch"])
    print(f"epochs seen after each kill: {epochs}; kills inside a write: {left_mid_write}")
    assert len(epochs) >= KILLS // 2 and epochs[-1] > epochs[0], epochs
    assert left_mid_write >= 3, "too few kills landed inside a checkpoint write to prove anything"
    last = epochs[-1]
    r = run_cli(["train", "-list", demo16[0], "-resume", "w.npz", "-epochs", last + 1, *FAST], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"epoch {last + 1}/{last + 1}" in r.stdout
    assert load_checkpoint(tmp_path / "w.npz").train_state["epoch"] == last + 1
    assert _temps(tmp_path) == []  # the resumed run cleared what the killed saves left


# -- SIGINT / SIGTERM, placed deterministically -----------------------------------------------------

def _args(list_path, save, epochs):
    return ["train", "-list", str(list_path), "-epochs", str(epochs), "-save", str(save), "-arch", "cifar",
            "-batchsize", "8", "-threads", "1", "-workers", "0", "-seed", "5"]


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_epoch_saves_and_restarts_that_epoch(demo16, tmp_path, monkeypatch, capsys, same_threads,
                                                        sig, code):
    real_grad_norm = train_module.grad_norm
    calls = []

    def signal_in_epoch_2_batch_1(params):
        calls.append(1)
        if len(calls) == 3:  # epoch 1 has two batches: this is epoch 2, batch 1
            os.kill(os.getpid(), sig)
        return real_grad_norm(params)

    monkeypatch.setattr(train_module, "grad_norm", signal_in_epoch_2_batch_1)
    save = tmp_path / "w.npz"
    assert main(_args(demo16[0], save, 5)) == code
    err = capsys.readouterr().err
    assert f"{signal.Signals(sig).name} in epoch 2 at batch 1: saved {save}" in err
    state = load_checkpoint(save).train_state
    assert state["epoch"] == 1 and state["interrupted"] == {"epoch": 2, "batch": 1}
    monkeypatch.setattr(train_module, "grad_norm", real_grad_norm)
    assert main(_args(demo16[0], save, 2)[:-6] + ["-resume", str(save), "-threads", "1", "-workers", "0"]) == 0
    err = capsys.readouterr().err
    assert "was interrupted at batch 1; that epoch starts over" in err
    assert load_checkpoint(save).train_state["epoch"] == 2


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_between_epochs_saves_the_whole_epoch_and_resume_is_exact(demo16, tmp_path, monkeypatch, capsys,
                                                                         same_threads, sig, code):
    real_save = train_module.save_checkpoint

    def signal_while_saving_epoch_1(*args, train_state, **kw):
        if train_state["epoch"] == 1:
            os.kill(os.getpid(), sig)  # arrives while the epoch's checkpoint is being written
        return real_save(*args, train_state=train_state, **kw)

    monkeypatch.setattr(train_module, "save_checkpoint", signal_while_saving_epoch_1)
    stopped = tmp_path / "stopped.npz"
    assert main(_args(demo16[0], stopped, 3)) == code
    assert f"{signal.Signals(sig).name} after epoch 1: saved {stopped}" in capsys.readouterr().err
    state = load_checkpoint(stopped).train_state
    assert state["epoch"] == 1 and "interrupted" not in state
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    assert main(["train", "-list", str(demo16[0]), "-resume", str(stopped), "-epochs", "3", "-threads", "1",
                 "-workers", "0"]) == 0
    straight = tmp_path / "straight.npz"
    assert main(_args(demo16[0], straight, 3)) == 0
    a, b = load_checkpoint(stopped), load_checkpoint(straight)
    assert a.train_state["epoch"] == b.train_state["epoch"] == 3
    for key, value in b.state_dict.items():
        assert np.array_equal(a.state_dict[key], value), key
