"""The models registry: Arch checks every field strictly, build() makes the model, and
state_shapes() / parameter_shapes() give every shape without allocating one."""
import dataclasses
import json
import math
import tracemalloc

import numpy as np
import pytest

from minialex import models
from minialex.data.listfile import MAX_CLASSES

VARIANTS = [("torchvision", 224), ("paper", 227), ("cifar", 32)]


@pytest.mark.parametrize("variant,size", VARIANTS)
def test_input_size_lives_in_the_registry(variant, size):
    assert models.INPUT_SIZE[variant] == size
    assert models.Arch(variant, 10).input_size == size


def test_from_dict_to_dict_round_trip_and_defaults():
    d = {"variant": "cifar", "num_classes": 7, "batch_norm": True, "dropout": 0.25, "input_size": 32}
    arch = models.Arch.from_dict(d)
    assert arch.to_dict() == d
    assert models.Arch.from_dict(json.loads(json.dumps(arch.to_dict()))) == arch
    assert models.Arch.from_dict({"variant": "paper", "num_classes": 3}).to_dict() == {
        "variant": "paper", "num_classes": 3, "batch_norm": False, "dropout": 0.5, "input_size": 227}
    assert models.Arch.from_dict({"variant": "cifar", "num_classes": 2, "dropout": 0}).dropout == 0.0
    assert models.Arch("cifar", MAX_CLASSES).num_classes == MAX_CLASSES   # the largest allowed
    with pytest.raises(dataclasses.FrozenInstanceError):
        arch.num_classes = 8


BAD = [
    ({"variant": "vgg"}, "variant"), ({"variant": 3}, "variant"), ({"variant": None}, "variant"),
    ({"num_classes": 0}, "num_classes"), ({"num_classes": -1}, "num_classes"),
    ({"num_classes": True}, "num_classes"), ({"num_classes": 2.0}, "num_classes"),
    ({"num_classes": "10"}, "num_classes"), ({"num_classes": MAX_CLASSES + 1}, "num_classes"),
    ({"batch_norm": "no"}, "batch_norm"), ({"batch_norm": "false"}, "batch_norm"),
    ({"batch_norm": 1}, "batch_norm"), ({"batch_norm": 0}, "batch_norm"), ({"batch_norm": None}, "batch_norm"),
    ({"dropout": 1.0}, "dropout"), ({"dropout": 1}, "dropout"), ({"dropout": -0.1}, "dropout"),
    ({"dropout": math.nan}, "dropout"), ({"dropout": math.inf}, "dropout"), ({"dropout": True}, "dropout"),
    ({"dropout": "0.5"}, "dropout"), ({"input_size": 225}, "input_size"), ({"input_size": True}, "input_size"),
    ({"input_size": "32"}, "input_size"), ({"input_size": None}, "input_size"),
    ({"input_size": 224}, "input_size"),   # torchvision's size for the cifar variant
    ({"layers": 8}, "layers"), ({"Batch_Norm": True}, "Batch_Norm"),
]


@pytest.mark.parametrize("change,field", BAD)
def test_from_dict_refuses_each_bad_field_in_one_line_naming_it(change, field):
    d = {"variant": "cifar", "num_classes": 10, "batch_norm": False, "dropout": 0.5, "input_size": 32}
    d.update(change)
    with pytest.raises(ValueError) as e:
        models.Arch.from_dict(d)
    msg = str(e.value)
    assert field in msg and "\n" not in msg, msg


def test_json_no_is_not_read_as_true():
    with pytest.raises(ValueError, match="batch_norm"):
        models.Arch.from_dict(json.loads('{"variant": "cifar", "num_classes": 10, "batch_norm": "no"}'))


@pytest.mark.parametrize("d,field", [({"num_classes": 10}, "variant"), ({"variant": "cifar"}, "num_classes"),
                                     (["cifar", 10], "architecture"), (None, "architecture")])
def test_from_dict_refuses_missing_fields_and_non_mappings(d, field):
    with pytest.raises(ValueError, match=field):
        models.Arch.from_dict(d)


def test_build_makes_the_described_model():
    model = models.build(models.Arch("cifar", 4, batch_norm=True, dropout=0.25))
    assert isinstance(model, models.AlexNet) and model.variant == "cifar" and model.num_classes == 4
    assert "features.1.running_mean" in model.state_dict()
    assert {m.p for m in model.classifier if hasattr(m, "p")} == {0.25}
    with pytest.raises(TypeError, match="Arch"):
        models.build({"variant": "cifar", "num_classes": 4})


@pytest.mark.parametrize("variant", ["torchvision", "paper", "cifar"])
@pytest.mark.parametrize("bn", [False, True])
def test_state_shapes_equal_the_built_models(variant, bn):
    arch = models.Arch(variant, 13, batch_norm=bn)
    model = models.build(arch)
    built = [(k, tuple(np.shape(v))) for k, v in model.state_dict().items()]
    assert list(models.state_shapes(arch).items()) == built
    assert list(models.parameter_shapes(arch).items()) == [(k, p.shape) for k, p in model.named_parameters()]


def test_shapes_of_a_huge_model_without_allocating_it():
    arch = models.Arch("torchvision", 100_000, batch_norm=True)
    tracemalloc.start()
    try:
        shapes = models.parameter_shapes(arch)
        everything = models.state_shapes(arch)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000      # the classifier alone would be 1.6 GB of float32
    assert shapes["classifier.6.weight"] == (100_000, 4096)
    assert everything["features.1.num_batches_tracked"] == ()
    assert "features.1.running_mean" not in shapes
