"""The training loop's pieces in-process: guards, evaluation, prediction, progress of one epoch."""
import math

import numpy as np
import pytest
from PIL import Image

import minialex
from minialex import models, nn, optim
from minialex.checkpoint import save_checkpoint
from minialex.evaluation import evaluate, format_confusion, predict
from minialex.train import Diverged, TrainConfig, _check_first_loss, grad_norm, train_epoch


class _NoStop:
    signum = None


def _tiny_model():
    minialex.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))


def _batches(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((4, 3, 4, 4)).astype(np.float32), rng.integers(0, 3, 4)) for _ in range(n)]


def _params(model):
    return [p.data.copy() for p in model.parameters()]


def test_grad_norm_matches_float64_reference():
    model = _tiny_model()
    rng = np.random.default_rng(1)
    for p in model.parameters():
        p.grad[...] = rng.standard_normal(p.grad.shape)
    expected = math.sqrt(sum(float((p.grad.astype(np.float64) ** 2).sum()) for p in model.parameters()))
    assert grad_norm(model.parameters(), chunk=7) == pytest.approx(expected, rel=1e-12)


def test_one_epoch_trains_and_reports():
    model = _tiny_model()
    opt = optim.SGD(model.parameters(), lr=0.1)
    before = _params(model)
    result, done = train_epoch(model, nn.CrossEntropyLoss(), opt, _batches(), 1,
                               TrainConfig(epochs=1, save="w.npz"), _NoStop(), None)
    loss, acc, images, seconds = result
    assert done == 3 and images == 12 and 0 <= acc <= 1 and math.isfinite(loss)
    assert any(not np.array_equal(a, p.data) for a, p in zip(before, model.parameters()))


def test_nan_loss_stops_before_the_step_naming_epoch_and_batch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.npz").write_bytes(b"last good epoch")
    model = _tiny_model()
    opt = optim.SGD(model.parameters(), lr=0.1)
    batches = _batches()
    batches[1][0][0, 0, 0, 0] = np.nan
    with pytest.raises(Diverged) as e:
        train_epoch(model, nn.CrossEntropyLoss(), opt, batches, 4, TrainConfig(epochs=5, save="w.npz"),
                    _NoStop(), None)
    message = str(e.value)
    assert "epoch 4, batch 2" in message and "loss is nan" in message
    assert "lower learning rate" in message and "-lr 0.01" in message and "w.npz left as it was" in message


def test_infinite_gradient_stops_without_updating_the_weights():
    model = _tiny_model()
    opt = optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    loss_fn.backward = lambda grad_out=1.0: np.full((4, 3), np.inf, dtype=np.float32)
    before = _params(model)
    with pytest.raises(Diverged, match="gradient norm is (inf|nan) at epoch 1, batch 1"):
        train_epoch(model, loss_fn, opt, _batches(), 1, TrainConfig(epochs=1, save="w.npz"), _NoStop(), None)
    assert all(np.array_equal(a, p.data) for a, p in zip(before, model.parameters()))


def test_signal_flag_stops_at_the_next_batch_boundary():
    """A signal during batch 1 lets it finish; the epoch stops before batch 2 (done == 1), and a
    signal already there before the first batch stops it before any step (done == 0)."""
    class Stop:
        signum = None

    class Batches(list):
        def __init__(self, stop):
            super().__init__(_batches())
            self.stop = stop

        def __iter__(self):
            for i, batch in enumerate(list.__iter__(self)):
                if i == 1:
                    self.stop.signum = 2   # arrives while batch 1 trains
                yield batch

    for stop, expected in ((Stop(), 1), (type("Stopped", (), {"signum": 2})(), 0)):
        model = _tiny_model()
        before = _params(model)
        result, done = train_epoch(model, nn.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.1),
                                   Batches(stop) if expected else _batches(), 1,
                                   TrainConfig(epochs=1, save="w.npz"), stop, None)
        assert result is None and done == expected
        changed = not all(np.array_equal(a, p.data) for a, p in zip(before, model.parameters()))
        assert changed == bool(expected)


def test_first_loss_check_warns_only_when_far_from_ln_classes(capsys):
    _check_first_loss(math.log(10) + 0.1, 10)
    assert capsys.readouterr().err == ""
    _check_first_loss(40.0, 10)
    err = capsys.readouterr().err
    assert "first batch loss 40.000" in err and "ln(10) = 2.303" in err and "normalised" in err


class _FixedLogits:
    """A model stand-in returning preset logits batch after batch."""

    def __init__(self, logits):
        self.logits = list(logits)
        self.training = True

    def eval(self):
        self.training = False
        return self

    def __call__(self, x):
        return self.logits.pop(0)


def test_evaluate_top1_top5_and_confusion():
    logits = np.array([[9, 1, 2, 3, 4, 5, 0],     # true 0: top-1 right
                       [9, 1, 2, 3, 4, 5, 0],     # true 1: not in top-5 (rank 6)
                       [1, 9, 8, 7, 6, 5, 4]],    # true 6: rank 7 -> miss; predicted 1
                      dtype=np.float32)
    y = np.array([0, 1, 6])
    extra = np.array([[0, 0, 0, 0, 0, 9, 8]], dtype=np.float32)  # true 6: second -> top-5 hit
    model = _FixedLogits([logits, extra])
    r = evaluate(model, [(None, y), (None, np.array([6]))], 7)
    assert not model.training
    assert r["n"] == 4 and r["top1"] == pytest.approx(1 / 4) and r["top5"] == pytest.approx(2 / 4)
    assert r["confusion"][0, 0] == 1 and r["confusion"][1, 0] == 1 and r["confusion"][6, 1] == 1
    assert r["confusion"][6, 5] == 1 and r["confusion"].sum() == 4


def test_format_confusion_small_and_large():
    conf = np.array([[3, 1], [0, 4]])
    text = format_confusion(conf, ["shirt", "shoe"])
    assert "shirt" in text and "75.00%" in text and "100.00%" in text
    big = np.eye(30, dtype=np.int64) * 5
    big[7, 7], big[7, 3] = 1, 4
    text = format_confusion(big, [f"c{i}" for i in range(30)], max_classes=5)
    assert text.splitlines()[1].split()[:3] == ["7", "c7", "20.00%"]


def test_predict_any_size_and_mode(tmp_path):
    minialex.manual_seed(0)
    model = models.alexnet(num_classes=3, variant="cifar")
    weights = tmp_path / "w.npz"
    save_checkpoint(weights, model, arch={"variant": "cifar", "num_classes": 3, "batch_norm": False,
                                          "input_size": 32},
                    class_names=["a", "b", "c"],
                    normalization={"mean": [0.5] * 3, "std": [0.25] * 3, "resize": 36, "crop": 32})
    rng = np.random.default_rng(0)
    paths = []
    for name, mode, size in [("grey.png", "L", (28, 28)), ("rgba.png", "RGBA", (300, 120)),
                             ("photo.jpeg", "RGB", (64, 97))]:
        arr = rng.integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
        Image.fromarray(arr[..., 0] if mode == "L" else arr, mode).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    results = predict(paths, weights, topk=5)
    assert [p for p, _ in results] == paths
    for _, top in results:
        assert len(top) == 3  # top-k is capped at the number of classes
        probs = [p for _, _, p in top]
        assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-6)
        assert {name for _, name, _ in top} == {"a", "b", "c"}


def test_pretrained_with_other_class_count_reinitialises_only_the_last_layer(tmp_path, capsys):
    from minialex.run import copy_pretrained
    minialex.manual_seed(1)
    source = models.alexnet(num_classes=10, variant="cifar")
    np.savez(tmp_path / "sd.npz", **source.state_dict())
    minialex.manual_seed(2)
    model = models.alexnet(num_classes=3, variant="cifar")
    fresh_head = model.state_dict()["classifier.6.weight"]
    copy_pretrained(model, dict(np.load(tmp_path / "sd.npz")), tmp_path / "sd.npz", 3)
    assert "re-initialising the last layer (classifier.6)" in capsys.readouterr().err
    loaded = model.state_dict()
    for k, v in source.state_dict().items():
        if k.startswith("classifier.6"):
            assert loaded[k].shape[0] == 3
        else:
            assert np.array_equal(loaded[k], v), k
    assert np.array_equal(loaded["classifier.6.weight"], fresh_head)


def test_without_list_uses_images_list_else_demo(tmp_path, monkeypatch):
    from minialex.data import demo_dataset
    from minialex.run import read_data
    monkeypatch.chdir(tmp_path)
    d = read_data(TrainConfig())
    demo = demo_dataset()
    assert d.lists == (demo.train_list, demo.test_list) and d.default_arch == "cifar" and len(d.class_names) == 10
    (tmp_path / "images.list").write_text(f"0 {d.train[0].path}\n1 {d.train[1].path}\n")
    d = read_data(TrainConfig())
    assert (d.lists == ("images.list", None) and d.default_arch == "torchvision" and len(d.train) == 2
            and d.val is None)


def test_plot_without_matplotlib_is_a_one_line_error(monkeypatch):
    import sys
    from minialex.errors import MinialexError
    from minialex.plot import require_matplotlib
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MinialexError, match=r"^-plot needs matplotlib, .*pip install") as e:
        require_matplotlib()
    assert "\n" not in str(e.value)


def test_resize_option_sets_the_crop_source_and_is_checked():
    from minialex.data import demo_dataset, read_list
    from minialex.errors import MinialexError
    from minialex.config import resolve
    from minialex.run import measure_normalization
    train = read_list(demo_dataset().train_list)[:20]
    norm = measure_normalization(resolve(TrainConfig(resize=40)), train, 32)
    assert norm["resize"] == 40 and norm["crop"] == 32
    assert measure_normalization(resolve(TrainConfig()), train, 32)["resize"] == 36
    for bad in (20, 65):   # below the crop, above twice the crop
        with pytest.raises(MinialexError, match=f"-resize {bad}"):
            measure_normalization(resolve(TrainConfig(resize=bad)), train, 32)
