"""Shape arithmetic shared by the layers and the kernels: one home for each rule.

`pair` turns PyTorch's "int or (h, w)" arguments into a tuple; `conv_output_size` and
`pool_output_size` are torch's output-size formulas (dilation 1), so a module's
`output_shape` and its kernel can never disagree.
"""


def pair(v):
    """(h, w) ints from an int or a 2-sequence, as PyTorch's kernel_size/stride/padding."""
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"expected an int or a pair of ints, got {v!r}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


def conv_output_size(h, w, kh, kw, stride, padding):
    """(oh, ow) of a convolution (or im2col) of an (h, w) input; stride, padding: (h, w) pairs.

    floor((size + 2 * pad - k) / stride) + 1 per axis; ValueError when the kernel does not fit
    the padded input, as torch refuses it too."""
    sh, sw = stride
    ph, pw = padding
    oh = (h + 2 * ph - kh) // sh + 1
    ow = (w + 2 * pw - kw) // sw + 1
    if oh <= 0 or ow <= 0:
        raise ValueError(
            f"kernel ({kh}, {kw}) larger than padded input ({h + 2 * ph}, {w + 2 * pw})")
    return oh, ow


def pool_output_size(size, k, s, p, ceil_mode):
    """torch's pooling_output_shape (dilation 1) along one axis.

    floor (or with ceil_mode, ceil) of (size + 2p - k) / s, plus one; with ceil_mode the last
    window must still start inside the input or its left padding, else it is dropped."""
    num = size + 2 * p - k
    out = (-(-num // s) if ceil_mode else num // s) + 1   # -(-a // b) is ceil(a / b) in integers
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def pool2d_output_size(h, w, kernel, stride, padding, ceil_mode):
    """(oh, ow) of a 2-D pooling; kernel, stride, padding: (h, w) pairs."""
    return (pool_output_size(h, kernel[0], stride[0], padding[0], ceil_mode),
            pool_output_size(w, kernel[1], stride[1], padding[1], ceil_mode))
