"""The run set-up: one source for every option (config.py), prepare_run's three modes (run.py),
-skip_bad's existence check and the plateau schedule through train. Hostile options and output
targets: tests/reliability/test_hostile_cli.py."""
import os
import subprocess
import sys
from dataclasses import fields

import numpy as np
import pytest

from minialex import config
from minialex.cli import build_parser
from minialex.config import TrainConfig, resolve
from minialex.errors import MinialexError

from helpers import FAST, REPO, run_cli


def _train_parser():
    return build_parser()._subparsers._group_actions[0].choices["train"]


# -- one source -------------------------------------------------------------------------------------

def test_every_option_has_one_description_that_the_parser_and_defaults_follow():
    dests = {a.dest: a for a in _train_parser()._actions if a.dest != "help"}
    cli_fields = {f.name for f in fields(TrainConfig) if f.metadata["cli"]}
    assert set(dests) == cli_fields
    for f in fields(TrainConfig):
        meta = f.metadata
        if f.name in dests:
            assert dests[f.name].help.startswith(meta["help"])
            assert f"-{meta['flag'] or f.name}" in dests[f.name].option_strings
            if meta["default"] is not None and not callable(meta["default"]) and not meta["switch"]:
                assert f"(default {meta['default']})" in dests[f.name].help
    resolved = resolve(TrainConfig())
    assert resolved.momentum == 0.9 and resolved.lr == 0.01 and resolved.patience == 2
    assert resolve(TrainConfig(optimizer="adam")).lr == 1e-3
    assert resolve(TrainConfig(epochs=9, schedule="step")).step_size == 3
    assert set(config.RESUMABLE) == {f.name for f in fields(TrainConfig) if f.metadata["resumable"]}
    assert "patience" in config.RESUMABLE and "epochs" not in config.RESUMABLE


def test_a_new_option_needs_only_its_field(monkeypatch):
    """Adding a field with option() metadata is all it takes to get a flag, a default and a check."""
    import dataclasses
    extra = dataclasses.make_dataclass(
        "Extended", [("warmup", int | None, config.option("warm-up epochs", default=3,
                                                          type=config.non_negative_int, metavar="N",
                                                          resumable=True))], bases=(TrainConfig,))
    monkeypatch.setattr(config, "TrainConfig", extra)
    monkeypatch.setattr(config, "RESUMABLE", config.RESUMABLE + ("warmup",))
    import argparse
    p = argparse.ArgumentParser()
    config.add_train_options(p)
    assert p.parse_args(["-warmup", "5"]).warmup == 5
    assert config.resolve(extra()).warmup == 3
    with pytest.raises(MinialexError, match="-warmup"):
        config.resolve(extra(warmup=-1))


def test_help_loads_no_numba_and_import_minialex_leaves_malloc_alone():
    code = """
import ctypes, sys
calls = []
class Spy(ctypes.CDLL):
    def __getattr__(self, name):
        if name == "mallopt":
            calls.append(name)
        return super().__getattr__(name)
ctypes.CDLL = Spy
import minialex.cli
for argv in (["-h"], ["train", "-h"], ["eval", "-h"], ["convert", "-h"]):
    try:
        minialex.cli.main(argv)
    except SystemExit:
        pass
assert "numba" not in sys.modules, "numba loaded by -h"
import minialex
from minialex import nn, models
models.alexnet(10, "cifar")
assert not calls, "import minialex tuned malloc"
from minialex._memory import keep_freed_memory
keep_freed_memory()
assert calls == ["mallopt"], calls   # the spy does see the tuning where training applies it
print("ok")
"""
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("MINIALEX_MALLOC", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr


# -- the three modes, -skip_bad, the plateau schedule ------------------------------------------------

def test_prepare_run_modes(demo16, tmp_path, same_threads, capsys):
    from minialex.run import prepare_run
    from minialex.train import fit
    base = dict(list_path=str(demo16[0]), epochs=1, batch_size=8, arch="cifar", threads=1, workers=0,
                seed=5, save=str(tmp_path / "a.npz"))
    fresh = prepare_run(TrainConfig(**base))
    assert fresh.fresh and fresh.start_epoch == 1 and fresh.arch["variant"] == "cifar"
    assert fresh.cfg.momentum == 0.9 and fresh.scheduler is None
    fit(fresh)
    resumed = prepare_run(TrainConfig(**dict(base, epochs=2, save=None, resume=base["save"], lr=0.5)))
    assert not resumed.fresh and resumed.start_epoch == 2 and resumed.cfg.lr == 0.01
    assert resumed.cfg.save == base["save"] and len(resumed.history) == 1
    assert "-lr taken from the checkpoint" in capsys.readouterr().err
    for a, b in zip(resumed.model.parameters(), fresh.model.parameters()):
        assert np.array_equal(a.data, b.data)
    tuned = prepare_run(TrainConfig(**dict(base, arch=None, save=str(tmp_path / "b.npz"),
                                           load_pretrained=base["save"], optimizer="adam")))
    assert not tuned.fresh and tuned.start_epoch == 1 and tuned.arch["variant"] == "cifar"
    assert tuned.normalization == fresh.normalization and tuned.cfg.lr == 1e-3
    assert "using the normalisation of" in capsys.readouterr().err


def test_skip_bad_leaves_out_missing_files_before_the_first_epoch(demo16, tmp_path, same_threads):
    from minialex.run import prepare_run
    lines = demo16[0].read_text().splitlines()
    lines.insert(3, f"1 {tmp_path / 'gone.png'}")
    (tmp_path / "l.list").write_text("\n".join(lines) + "\n")
    cfg = TrainConfig(list_path=str(tmp_path / "l.list"), epochs=1, batch_size=8, arch="cifar", threads=1,
                      workers=0, save=str(tmp_path / "w.npz"))
    with pytest.raises(MinialexError, match=r"l\.list:4: image not found"):
        prepare_run(cfg)
    run = prepare_run(TrainConfig(**{**cfg.__dict__, "skip_bad_images": True}))
    assert len(run.train_loader.samples) == len(lines) - 1
    (tmp_path / "none.list").write_text(f"0 {tmp_path / 'a.png'}\n1 {tmp_path / 'b.png'}\n")
    with pytest.raises(MinialexError, match="none of the 2 listed images exists"):
        prepare_run(TrainConfig(**{**cfg.__dict__, "skip_bad_images": True,
                                   "list_path": str(tmp_path / "none.list")}))


def test_plateau_says_what_it_watches_and_honours_patience(demo16, tmp_path):
    import json
    args = ["train", "-list", demo16[0], "-schedule", "plateau", "-lr", "1e-6", *FAST]
    r = run_cli([*args, "-epochs", "1", "-save", "a.npz"], cwd=tmp_path, timeout=300)
    assert r.returncode == 0 and "plateau watches the training loss (patience 2 epochs)" in r.stderr
    r = run_cli([*args, "-epochs", "3", "-patience", "0", "-val", demo16[0], "-log", "log.jsonl"],
                cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "-schedule plateau watches the validation loss (patience 0 epochs)" in r.stderr
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    # At a rate of 1e-6 the validation loss cannot improve by plateau's 1e-4 relative threshold,
    # so with patience 0 every epoch after the first steps the rate down by -gamma 0.1.
    assert lrs == pytest.approx([1e-6, 1e-6, 1e-7]), lrs
