"""Hostile command lines: options refused before anything is read, output targets that are not
regular files, and text from a checkpoint that would drive the terminal."""
import os

import pytest

from minialex import config
from minialex.cli import main
from minialex.config import TrainConfig, resolve
from minialex.errors import MinialexError

from .conftest import FAST, assert_one_line_error, run_cli


@pytest.mark.parametrize("args, fragments", [
    (["-batch", "4"], ["unrecognized arguments: -batch"]),          # no prefix matching
    (["-epoch", "4"], ["unrecognized arguments: -epoch"]),
    (["-milestones", "-3,5"], ["-milestones"]),
    (["-milestones", "5,3"], ["increasing"]),
    (["-seed", "-1"], ["-seed", "0 or more"]),
    (["-lr", "nan"], ["-lr", "not a finite number"]),
    (["-optimizer", "adam", "-momentum", "0.5"], ["-momentum", "SGD's", "adam"]),
    (["-schedule", "multistep"], ["-milestones"]),
    (["-patience", "-1"], ["-patience"]),
    (["-resume", "a.npz", "-load_pretrained", "b.npz"], ["-resume", "-load_pretrained"]),
])
def test_bad_options_are_one_line_before_anything_is_read(tmp_path, capsys, args, fragments):
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minialex: error: "), err
    for fragment in fragments:
        assert fragment in err[0]


@pytest.mark.parametrize("field_name, value, fragment", [
    ("lr", float("nan"), "-lr"), ("lr", -1.0, "-lr"), ("batch_size", 0, "-batchsize"),
    ("batch_norm", "no", "-bn"), ("milestones", [-2], "-milestones"), ("optimizer", "rmsprop", "-optimizer"),
    ("seed", 1.5, "-seed"), ("dropout", 1.0, "-dropout"), ("patience", True, "-patience"),
])
def test_a_resumed_config_is_checked_as_the_command_line_is(field_name, value, fragment):
    good = config.resumable_values(resolve(TrainConfig()))
    assert resolve(TrainConfig(), dict(good)).lr == good["lr"]
    with pytest.raises(MinialexError, match=fragment):
        resolve(TrainConfig(), dict(good, **{field_name: value}))



# -- targets checked before the work ----------------------------------------------------------------

def _targets(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "folder").mkdir()
    return {"fifo": (str(fifo), "FIFO"), "folder": (str(tmp_path / "folder"), "folder"),
            "slash": (str(tmp_path / "w") + "/", "folder"), "empty": ("", "give a file name"),
            "no_dir": (str(tmp_path / "nowhere" / "w.npz"), "does not exist"),
            "devnull": ("/dev/null", "device")}


@pytest.mark.parametrize("target", ["fifo", "folder", "slash", "empty", "no_dir", "devnull"])
@pytest.mark.parametrize("flag", ["-save", "-log", "-plot"])
def test_bad_output_targets_fail_before_training(demo16, tmp_path, flag, target):
    path, fragment = _targets(tmp_path)[target]
    if flag == "-plot":
        pytest.importorskip("matplotlib")
    if target == "devnull" and os.geteuid() != 0:
        pytest.skip("replacing /dev/null needs root; the FIFO case covers non-regular files")
    stale = tmp_path / ".tmp"   # what "-save ''" used to delete: temporaries in the parent folder
    stale.write_text("keep")
    r = run_cli(["train", "-list", demo16[0], "-epochs", "1", flag, path, *FAST], cwd=tmp_path, timeout=60)
    assert_one_line_error(r, flag, fragment)
    assert "mean/std" not in r.stderr and "training cifar" not in r.stderr  # before any work
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")
    if target == "fifo":
        import stat
        assert stat.S_ISFIFO(os.stat(path).st_mode)
    assert stale.read_text() == "keep"



# -- what is printed from a checkpoint is escaped ------------------------------------------------------

def test_class_names_from_a_checkpoint_cannot_drive_the_terminal(demo16, tmp_path, capsys, same_threads):
    import minialex
    from minialex import models
    from minialex.checkpoint import save_checkpoint
    minialex.manual_seed(0)
    model = models.alexnet(num_classes=3, variant="cifar")
    names = ["\x1b[2J\x1b[Hwrote out.npz", "b\u202eevil", "c" * 256]
    arch = {"variant": "cifar", "num_classes": 3, "batch_norm": False, "input_size": 32, "dropout": 0.5}
    norm = {"mean": [0.5] * 3, "std": [0.25] * 3, "resize": 36, "crop": 32}
    save_checkpoint(tmp_path / "w.npz", model, arch=arch, class_names=names, normalization=norm)
    image = demo16[1][0].path
    assert main(["inference", "-input", image, "-load", str(tmp_path / "w.npz"), "-threads", "1"]) == 0
    listed = tmp_path / "three.list"
    listed.write_text("".join(f"{i} {s.path}\n" for i, s in enumerate(demo16[1][:3])))
    assert main(["eval", "-list", str(listed), "-load", str(tmp_path / "w.npz"), "-threads", "1",
                 "-workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\u202e" not in out
    assert "\\x1b[2J" in out and "\\u202e" in out
    assert max(len(line) for line in out.splitlines()) < 400
