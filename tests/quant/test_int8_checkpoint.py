"""The int8 checkpoint section: save -> load gives the same model bit for bit, in the documented
layout; float-only readers refuse it."""
import json

import numpy as np
import pytest

from minialex.checkpoint import (HEADER_KEY, INT8_VERSION, CheckpointError, load_checkpoint, load_weights,
                                 model_from_checkpoint, save_int8_checkpoint)
from minialex.models.quantized import QuantizedAlexNet

from .conftest import calibrated


def test_save_load_round_trip_is_exact(trained, demo_lists, test_images, tmp_path):
    ckpt, _, result = calibrated(trained, demo_lists[0], images=16, criteria=("percentile",))
    q = result.best.model
    path = tmp_path / "w8.npz"
    save_int8_checkpoint(path, q, class_names=ckpt.class_names, normalization=ckpt.normalization)
    back = load_checkpoint(path, int8=True)
    assert back.int8["version"] == INT8_VERSION and back.int8["criterion"] == "percentile"
    assert back.int8["calibration"]["images"] == 16 and back.state_dict == {}
    assert (back.arch, back.class_names) == (ckpt.arch, ckpt.class_names)
    assert back.normalization == ckpt.normalization
    p, r = q.params, back.int8["params"]
    assert (p.input_scale, p.activation_scales) == (r.input_scale, r.activation_scales)
    assert list(p.layers) == list(r.layers)
    for key in p.layers:
        for a, b in zip(p.layers[key], r.layers[key]):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
    loaded = model_from_checkpoint(back)
    assert isinstance(loaded, QuantizedAlexNet)
    x = test_images[:8]
    np.testing.assert_array_equal(loaded(x), q(x))   # bit for bit
    # the documented layout: no float weights, the arrays under int8/
    with np.load(path) as z:
        names = set(z.files)
        header = json.loads(z[HEADER_KEY].tobytes())
        assert z["int8/features.0.weight"].dtype == np.int8
        assert z["int8/features.0.bias"].dtype == np.int32
        assert z["int8/classifier.6.weight_scale"].dtype == np.float32
    assert not any(n.startswith("model/") for n in names)
    assert header["int8"]["input"] == {"scale": p.input_scale, "zero_point": 128}
    assert set(header["int8"]["activations"]) == set(p.activation_scales)


def test_float_readers_refuse_an_int8_checkpoint(trained, demo_lists, tmp_path):
    ckpt, _, result = calibrated(trained, demo_lists[0], images=8, criteria=("max",))
    path = tmp_path / "w8.npz"
    save_int8_checkpoint(path, result.best.model, class_names=ckpt.class_names,
                         normalization=ckpt.normalization)
    for read in (load_checkpoint, load_weights):
        with pytest.raises(CheckpointError, match="is an int8 checkpoint"):
            read(path)
    assert load_checkpoint(trained, int8=True).int8 is None   # a float one reads as before
