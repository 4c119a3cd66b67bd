"""PyTorch weights -> minialex checkpoint: the converted model computes what torch computes."""
import numpy as np
import pytest

import minialex
from minialex import models
from minialex.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from minialex.data import IMAGENET_MEAN, IMAGENET_STD, EvalTransform
from minialex.errors import CheckpointError
from minialex.interop.compare import torch_model_like
from minialex.interop.convert import (convert_torch_file, imagenet_class_names,
                                      read_torch_state_dict)

FORMATS = {"zip": True, "legacy": False}


def relative_error(ours, ref):
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def torch_alexnet(torch, num_classes=1000):
    """torchvision's AlexNet from plain torch.nn: same layers, indices and state_dict keys."""
    nn = torch.nn

    class TorchAlexNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2),
                nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2),
                nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2))
            self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
            self.classifier = nn.Sequential(
                nn.Dropout(p=0.5), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True),
                nn.Dropout(p=0.5), nn.Linear(4096, 4096), nn.ReLU(inplace=True),
                nn.Linear(4096, num_classes))

        def forward(self, x):
            return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

    return TorchAlexNet().eval()


def photos(size, resize):
    """astronaut, chelsea (a cat) and coffee, resized, centre-cropped and ImageNet-normalised."""
    skdata = pytest.importorskip("skimage.data")
    transform = EvalTransform(size, resize, IMAGENET_MEAN, IMAGENET_STD)
    return np.stack([transform(img) for img in (skdata.astronaut(), skdata.chelsea(), skdata.coffee())])


@pytest.fixture(scope="module")
def torchvision_weights(torch, tmp_path_factory):
    """A randomly initialised torch AlexNet, saved in both torch.save formats, and its logits."""
    torch.manual_seed(0)
    net = torch_alexnet(torch)
    folder = tmp_path_factory.mktemp("torchvision")
    paths = {}
    for fmt, zip_format in FORMATS.items():
        paths[fmt] = folder / f"alexnet_{fmt}.pth"
        torch.save(net.state_dict(), paths[fmt], _use_new_zipfile_serialization=zip_format)
    x = photos(224, 256)
    with torch.no_grad():
        logits = net(torch.from_numpy(x)).numpy()
    return net, paths, x, logits


@pytest.mark.parametrize("fmt", FORMATS)
def test_converted_torchvision_alexnet_matches_torch_on_photos(torchvision_weights, tmp_path, fmt):
    net, paths, x, torch_logits = torchvision_weights
    out = tmp_path / "w.npz"
    arch = convert_torch_file(paths[fmt], out)
    assert arch == {"variant": "torchvision", "num_classes": 1000, "batch_norm": False, "dropout": 0.5,
                    "input_size": 224}
    ckpt = load_checkpoint(out)
    assert ckpt.arch == arch
    assert ckpt.class_names == imagenet_class_names()
    assert ckpt.class_names[281] == "tabby" and ckpt.class_names[999] == "toilet tissue"
    assert ckpt.normalization == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                  "resize": 256, "crop": 224, "pca_eigval": [0.2175, 0.0188, 0.0045],
                                  "pca_eigvec": [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.814],
                                                 [-0.5836, -0.6948, 0.4203]]}
    for key, value in net.state_dict().items():
        np.testing.assert_array_equal(ckpt.state_dict[key], value.numpy(), err_msg=key)
    logits = model_from_checkpoint(ckpt)(x)
    assert relative_error(logits, torch_logits) < 1e-4
    # Different photos must give different scores, or the comparison above proves little.
    assert relative_error(torch_logits[0], torch_logits[1]) > 1e-3


def test_reader_needs_no_torch_and_matches_torch_load(torchvision_weights, torch):
    _, paths, _, _ = torchvision_weights
    reference = torch.load(paths["zip"], weights_only=True)
    for fmt in FORMATS:
        state = read_torch_state_dict(paths[fmt])
        assert list(state) == list(reference)
        for key in reference:
            np.testing.assert_array_equal(state[key], reference[key].numpy())


@pytest.mark.parametrize("wrap", ["state_dict", "model", "dataparallel", "features_dataparallel"])
def test_wrapped_state_dicts_are_found(torch, tmp_path, wrap):
    minialex.manual_seed(1)
    model = models.alexnet(num_classes=10, variant="cifar").eval()
    net = torch_model_like(model)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
    sd = net.state_dict()
    if wrap in ("state_dict", "model"):
        obj = {"epoch": 90, "arch": "alexnet", wrap: sd, "best_acc1": torch.tensor(0.5)}
    elif wrap == "dataparallel":
        obj = {f"module.{k}": v for k, v in sd.items()}
    else:   # PyTorch's ImageNet example wraps only AlexNet's features in DataParallel
        obj = {"state_dict": {k.replace("features.", "features.module."): v for k, v in sd.items()}}
    path = tmp_path / "wrapped.pth"
    torch.save(obj, path)
    out = tmp_path / "w.npz"
    arch = convert_torch_file(path, out, arch="cifar")
    assert arch["num_classes"] == 10 and arch["input_size"] == 32
    ckpt = load_checkpoint(out)
    assert ckpt.class_names == [f"class_{i}" for i in range(10)]
    assert list(ckpt.state_dict) == list(model.state_dict())
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(ckpt.state_dict[key], value)


def test_paper_variant_round_trips_through_our_checkpoint_and_through_torch(torch, tmp_path):
    minialex.manual_seed(2)
    model = models.alexnet(num_classes=10, variant="paper").eval()
    x = photos(227, 256)
    logits = model(x)

    # Through our own checkpoint: bit for bit.
    ours = tmp_path / "paper.npz"
    save_checkpoint(ours, model, arch={"variant": "paper", "num_classes": 10, "batch_norm": False,
                                       "input_size": 227},
                    class_names=[f"c{i}" for i in range(10)],
                    normalization={"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                                   "resize": 256, "crop": 227})
    np.testing.assert_array_equal(model_from_checkpoint(load_checkpoint(ours))(x), logits)

    # Through torch tensors: minialex weights -> torch model -> .pth -> convert -> minialex.
    net = torch_model_like(model).eval()
    net.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
    with torch.no_grad():
        torch_logits = net(torch.from_numpy(x)).numpy()
    assert relative_error(logits, torch_logits) < 1e-4
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"{i} thing number {i}\n" for i in range(10)))
    pth = tmp_path / "paper.pth"   # the legacy format is covered by the torchvision test
    torch.save(net.state_dict(), pth)
    out = tmp_path / "paper_converted.npz"
    convert_torch_file(pth, out, arch="paper", labels=labels)
    ckpt = load_checkpoint(out)
    assert ckpt.arch["variant"] == "paper" and ckpt.normalization["crop"] == 227
    assert ckpt.class_names[3] == "thing number 3"
    np.testing.assert_array_equal(model_from_checkpoint(ckpt)(x), logits)


def test_weights_of_another_architecture_are_refused(torch, tmp_path):
    minialex.manual_seed(3)
    net = torch_model_like(models.alexnet(num_classes=10, variant="cifar"))
    path = tmp_path / "cifar.pth"
    torch.save(net.state_dict(), path)
    out = tmp_path / "w.npz"
    with pytest.raises(CheckpointError, match=f"^{path}: weights are for another architecture: 'features.0.weight' has shape "
                                                 r"\(48, 3, 7, 7\), AlexNet paper with 10 classes needs \(96, 3, 11, 11\)"):
        convert_torch_file(path, out, arch="paper")
    assert not out.exists()
    torch.save({"features.0.weight": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="no classifier"):
        convert_torch_file(path, out)
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(CheckpointError, match="not a tensor"):
        convert_torch_file(path, out)


def test_labels_file_must_match_the_class_count(torch, tmp_path):
    net = torch_model_like(models.alexnet(num_classes=10, variant="cifar"))
    path = tmp_path / "cifar.pth"
    torch.save(net.state_dict(), path)
    labels = tmp_path / "labels.txt"
    labels.write_text("0 cat\n1 dog\n")
    with pytest.raises(CheckpointError, match=f"^{labels}: names 2 classes, but .* have 10"):
        convert_torch_file(path, tmp_path / "w.npz", arch="cifar", labels=labels)
