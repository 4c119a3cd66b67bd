"""minialex.shapes: the one home of pair and the conv / pool output-size rules, against torch."""
import pathlib
import re

import pytest

import minialex
from minialex import nn, shapes


def test_pair():
    assert shapes.pair(3) == (3, 3)
    assert shapes.pair((2, 5)) == (2, 5)
    assert shapes.pair([1, 4]) == (1, 4)
    with pytest.raises(ValueError, match="pair"):
        shapes.pair((1, 2, 3))


def test_pool_output_size_matches_torch_with_and_without_ceil_mode(torch):
    for size in range(1, 16):
        for k in range(1, 6):
            for s in range(1, 4):
                for p in range(0, k // 2 + 1):
                    if size + 2 * p < k:
                        continue
                    for ceil_mode in (False, True):
                        x = torch.zeros(1, 1, size, size + 1)
                        y = torch.nn.functional.max_pool2d(x, k, s, p, ceil_mode=ceil_mode)
                        assert shapes.pool2d_output_size(size, size + 1, (k, k), (s, s), (p, p), ceil_mode) \
                            == tuple(y.shape[2:]), (size, k, s, p, ceil_mode)
                        assert shapes.pool_output_size(size, k, s, p, ceil_mode) == y.shape[2]


def test_conv_output_size_matches_torch(torch):
    for h, w, kh, kw, s, p in [(224, 224, 11, 11, (4, 4), (2, 2)), (227, 227, 11, 11, (4, 4), (0, 0)),
                               (7, 9, 3, 2, (2, 3), (0, 1)), (5, 5, 5, 5, (1, 1), (0, 0))]:
        y = torch.nn.functional.conv2d(torch.zeros(1, 1, h, w), torch.zeros(1, 1, kh, kw), stride=s, padding=p)
        assert shapes.conv_output_size(h, w, kh, kw, s, p) == tuple(y.shape[2:])
    with pytest.raises(ValueError, match="larger than padded input"):
        shapes.conv_output_size(2, 2, 5, 5, (1, 1), (1, 1))


def test_layers_and_kernels_use_the_one_rule():
    assert nn.MaxPool2d(3, 2, ceil_mode=True).output_shape((1, 2, 6, 6)) == (1, 2, 3, 3)


def test_no_module_keeps_its_own_copy_of_a_shape_rule():
    root = pathlib.Path(minialex.__file__).parent
    copies = []
    for path in root.rglob("*.py"):
        if path.name == "shapes.py":
            continue
        text = path.read_text()
        for name in re.findall(r"^\s*def (_?pair|\w*output_size)\(", text, re.M):
            copies.append(f"{path.relative_to(root)}: def {name}")
    assert copies == []
