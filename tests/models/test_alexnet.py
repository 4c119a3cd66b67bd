"""The three AlexNet variants: shapes, parameter counts, torchvision keys, logits against torch,
and a backward chain that can overfit one batch."""
import math

import numpy as np
import pytest

import minialex
from minialex import models, nn, optim

TORCHVISION_KEYS = [
    "features.0.weight", "features.0.bias", "features.3.weight", "features.3.bias",
    "features.6.weight", "features.6.bias", "features.8.weight", "features.8.bias",
    "features.10.weight", "features.10.bias", "classifier.1.weight", "classifier.1.bias",
    "classifier.4.weight", "classifier.4.bias", "classifier.6.weight", "classifier.6.bias"]


def _count(model):
    return sum(p.data.size for p in model.parameters())


def test_torchvision_variant_has_torchvision_keys_and_shapes():
    model = models.alexnet()
    sd = model.state_dict()
    assert list(sd) == TORCHVISION_KEYS
    assert sd["features.0.weight"].shape == (64, 3, 11, 11)
    assert sd["classifier.1.weight"].shape == (4096, 9216)
    assert sd["classifier.6.weight"].shape == (1000, 4096)
    assert _count(model) == 61_100_840
    assert all(v.dtype == np.float32 for v in sd.values())


@pytest.mark.parametrize("variant,size,params", [
    ("torchvision", 224, 61_100_840),
    # paper: 96*3*121+96 + (256*48*25+256) + (384*256*9+384) + 2*(384*192*9)/... computed below
    ("paper", 227, None),
    ("cifar", 32, None)])
def test_output_shapes_and_parameter_counts(variant, size, params):
    model = models.alexnet(num_classes=10, variant=variant)
    assert models.INPUT_SIZE[variant] == size
    assert model.output_shape((2, 3, size, size)) == (2, 10)
    rows = models.summary(model, (1, 3, size, size), print_table=False)
    assert sum(r["params"] for r in rows) == _count(model)
    if variant == "paper":
        conv = (96 * 3 * 121 + 96) + (256 * 48 * 25 + 256) + (384 * 256 * 9 + 384) + (384 * 192 * 9 + 384) + (256 * 192 * 9 + 256)
        fc = (9216 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * 10 + 10)
        assert _count(model) == conv + fc
    if variant == "cifar":
        conv = (48 * 3 * 49 + 48) + (128 * 48 * 25 + 128) + (192 * 128 * 9 + 192) + (128 * 192 * 9 + 128)
        fc = (512 * 2048 + 2048) + (2048 * 2048 + 2048) + (2048 * 10 + 10)
        assert _count(model) == conv + fc


@pytest.mark.parametrize("variant", ["torchvision", "paper", "cifar"])
def test_flatten_is_a_plain_child_that_adds_no_state(variant):
    model = models.alexnet(num_classes=10, variant=variant, batch_norm=True)
    assert list(model._modules) == ["features", "avgpool", "flatten", "classifier"]
    assert isinstance(dict(model.named_modules())["flatten"], nn.Flatten)
    assert not any(k.startswith("flatten") for k in model.state_dict())
    rows = models.summary(model, (1, 3, models.INPUT_SIZE[variant], models.INPUT_SIZE[variant]),
                          print_table=False)
    flat = next(r for r in rows if r["name"] == "flatten")
    assert flat["layer"] == "Flatten" and flat["output_shape"] == (1, model.classifier[1].in_features)


@pytest.mark.parametrize("variant,bn", [("torchvision", False), ("paper", True), ("cifar", False)])
def test_every_conv_followed_by_relu_is_declared_fused_and_the_image_gradient_skipped(variant, bn):
    model = models.alexnet(num_classes=3, variant=variant, batch_norm=bn)
    calls = []
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    for i, conv in enumerate(convs):
        conv.forward_relu = (lambda f, i: lambda x: calls.append(("fused", i)) or f(x))(conv.forward_relu, i)
        conv.backward = (lambda f, i: lambda g, need_input_grad=True:
                         calls.append(("backward", i, need_input_grad)) or f(g, need_input_grad))(conv.backward, i)
    size = models.INPUT_SIZE[variant]
    model(np.zeros((1, 3, size, size), np.float32))
    # with batch norm between them the conv and its ReLU are not adjacent, so nothing fuses
    assert [c for c in calls if c[0] == "fused"] == ([] if bn else [("fused", i) for i in range(len(convs))])
    assert model.backward(np.ones((1, 3), np.float32)) is None
    assert ("backward", 0, False) in calls and ("backward", 1, True) in calls


def test_summary_prints_totals(capsys):
    rows = models.summary(models.alexnet(), (1, 3, 224, 224))
    out = capsys.readouterr().out
    assert "61,100,840" in out
    conv1 = rows[0]
    assert conv1["output_shape"] == (1, 64, 55, 55)
    assert conv1["macs"] == 64 * 55 * 55 * 3 * 121


def test_batch_norm_after_every_convolution():
    model = models.alexnet(num_classes=10, variant="cifar", batch_norm=True)
    layers = list(model.features)
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.Conv2d):
            assert isinstance(layers[i + 1], nn.BatchNorm2d)
            assert layers[i + 1].num_features == layer.out_channels
    assert "features.1.running_mean" in model.state_dict()


def test_paper_initialisation():
    minialex.manual_seed(0)
    model = models.alexnet(variant="paper")
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    fcs = [m for m in model.classifier if isinstance(m, nn.Linear)]
    assert [float(m.bias.data.mean()) for m in convs] == [0.0, 1.0, 0.0, 1.0, 1.0]
    assert [float(m.bias.data.mean()) for m in fcs] == [1.0, 1.0, 0.0]
    assert abs(float(fcs[0].weight.data.std()) - 0.01) < 1e-4
    assert [m.groups for m in convs] == [1, 2, 1, 2, 2]


def test_unknown_variant_and_bad_input_size():
    with pytest.raises(ValueError, match="variant"):
        models.alexnet(variant="vgg")
    model = models.alexnet(num_classes=3, variant="cifar")
    with pytest.raises(ValueError, match="Linear expects"):
        model(np.zeros((1, 3, 40, 40), np.float32))


def test_manual_seed_reproduces_initialisation():
    minialex.manual_seed(7)
    a = models.alexnet(num_classes=5, variant="cifar").state_dict()
    minialex.manual_seed(7)
    b = models.alexnet(num_classes=5, variant="cifar").state_dict()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_load_state_dict_reports_wrong_keys_and_shapes():
    model = models.alexnet(num_classes=10, variant="cifar")
    sd = model.state_dict()
    sd["extra.weight"] = np.zeros(3, np.float32)
    del sd["features.0.bias"]
    sd["classifier.6.weight"] = np.zeros((5, 2048), np.float32)
    with pytest.raises(ValueError) as e:
        model.load_state_dict(sd)
    msg = str(e.value)
    assert "features.0.bias" in msg and "extra.weight" in msg and "classifier.6.weight" in msg


def _images(n, size, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


@pytest.mark.parametrize("variant,bn", [("torchvision", False), ("paper", False), ("cifar", True)])
def test_logits_match_torch_in_float32_and_grads_in_float64(variant, bn):
    torch = pytest.importorskip("torch", reason="torch is the reference")
    from tests.torch_reference import torch_model_like
    minialex.manual_seed(3)
    model = models.alexnet(num_classes=10, variant=variant, batch_norm=bn).eval()
    net = torch_model_like(model).eval()
    size = models.INPUT_SIZE[variant]
    x = _images(2, size)
    logits = model(x)
    ref = net(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))

    # Gradients through a whole network are ill-conditioned in float32 (the paper variant's
    # input gradient differs by several percent between torch's float32 and float64), so the
    # backward chain is compared in float64, where a wrong index cannot hide in rounding.
    model.to(np.float64)
    net = net.double()
    x64 = x.astype(np.float64)
    logits = model(x64)
    xt = torch.from_numpy(x64).requires_grad_(True)
    ref = net(xt)
    g = np.random.default_rng(1).standard_normal(logits.shape)
    dx = model.backward(g, need_input_grad=True)
    ref.backward(torch.from_numpy(g))
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-7, atol=1e-9 * float(np.abs(xt.grad.numpy()).max()))
    for (name, p), (tname, tp) in zip(model.named_parameters(), net.named_parameters()):
        assert name == tname
        want = tp.grad.numpy()
        np.testing.assert_allclose(p.grad, want, rtol=1e-7, atol=1e-9 * float(np.abs(want).max()), err_msg=name)


def test_overfits_one_small_batch():
    minialex.manual_seed(0)
    model = models.alexnet(num_classes=4, variant="cifar", dropout=0.0)
    x = _images(8, 32, seed=5)
    y = np.arange(8) % 4
    loss_fn = nn.CrossEntropyLoss()
    opt = optim.Adam(model.parameters(), lr=1e-3)
    first = None
    for _ in range(100):
        loss = loss_fn(model(x), y)
        first = loss if first is None else first
        model.zero_grad()
        model.backward(loss_fn.backward())
        opt.step()
        if loss < 0.01:
            break
    assert abs(first - math.log(4)) < 0.5
    assert loss < 0.01
