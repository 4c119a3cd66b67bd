"""Layer-by-layer comparison with PyTorch, on the small variant."""
import io
import sys

import numpy as np
import pytest
from PIL import Image

import minialex
from minialex import models
from minialex.checkpoint import save_checkpoint
from minialex.errors import MinialexError
from minialex.interop.compare import compare_files, compare_models, torch_model_like

NORM = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "resize": 36, "crop": 32}


@pytest.fixture
def tiny_case(torch, tmp_path):
    """A cifar AlexNet as a checkpoint, the same weights as a .pth, and an image."""
    minialex.manual_seed(4)
    model = models.alexnet(num_classes=10, variant="cifar", batch_norm=True).eval()
    ckpt = tmp_path / "w.npz"
    save_checkpoint(ckpt, model, arch={"variant": "cifar", "num_classes": 10, "batch_norm": True,
                                       "input_size": 32},
                    class_names=[str(i) for i in range(10)], normalization=NORM)
    net = torch_model_like(model)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
    pth = tmp_path / "w.pth"
    torch.save(net.state_dict(), pth)
    img = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(img)
    return model, net, ckpt, pth, img


def test_same_weights_agree_at_every_layer(tiny_case):
    _, _, ckpt, pth, img = tiny_case
    out = io.StringIO()
    rows = compare_files(ckpt, pth, img, out=out)
    names = [r.name for r in rows]
    assert names[0] == "features.0" and "avgpool" in names and "flatten" in names
    assert names[-1] == "classifier.6" and rows[-1].shape == (1, 10)
    assert all(r.agrees for r in rows)
    assert all(r.max_abs_value > 0 for r in rows)
    text = out.getvalue()
    assert "sum |diff|" in text and "max |diff|" in text and "all " in text and "agree" in text
    assert len(text.splitlines()) == len(rows) + 3


def test_mismatch_shows_at_the_first_layer_that_differs(tiny_case, torch):
    model, net, ckpt, pth, img = tiny_case
    with torch.no_grad():
        net.features[5].weight[0, 0, 0, 0] += 0.5     # the second convolution (after bn, relu, lrn, pool)
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32), dtype=np.float32)
    rows = compare_models(model, net, x)
    first_bad = next(r for r in rows if not r.agrees)
    assert first_bad.name == "features.5" and first_bad.kind == "Conv2d"
    assert all(r.agrees for r in rows[:rows.index(first_bad)])
    assert first_bad.max_abs_diff > 0 and first_bad.sum_abs_diff >= first_bad.max_abs_diff

    torch.save(net.state_dict(), pth)
    out = io.StringIO()
    compare_files(ckpt, pth, img, out=out)
    marked = [line for line in out.getvalue().splitlines() if "first mismatch" in line]
    assert len(marked) == 1 and marked[0].startswith("features.5 ")


def test_missing_torch_is_a_clear_error(tiny_case, monkeypatch):
    _, _, ckpt, pth, img = tiny_case
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(MinialexError, match=r"compare needs PyTorch.*pip install torch"):
        compare_files(ckpt, pth, img)
