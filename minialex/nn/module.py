"""Parameter and Module: the bookkeeping every layer shares (Sequential is in container.py).

A Module's `forward(x)` keeps what its `backward` needs with `self.save(...)`, under exactly the
names its class lists in `saved`; `backward(grad_out, need_input_grad=True)` takes them back
once with `self.take()`, accumulates into its parameters' `.grad` and returns the gradient of its
input. Names and semantics follow PyTorch so that state_dict keys and habits carry over.
"""
from collections import OrderedDict

import numpy as np

from .._memory import aligned_zeros_like


class Parameter:
    """A trainable array: `.data` and its gradient `.grad` (same shape and dtype).

    Gradients accumulate across backward calls until `zero_grad()`, as in PyTorch.
    `zero_grad()` is lazy: it only marks the gradient as zero, and the next backward writes
    its result instead of adding it (for AlexNet's 61 M parameters that saves clearing and
    re-reading 244 MB every step). Reading `.grad` in between gives zeros, as expected.
    """

    __slots__ = ("data", "_grad", "_grad_pending_zero")

    def __init__(self, data):
        self.data = np.ascontiguousarray(data)
        self._grad = aligned_zeros_like(self.data)  # aligned: see kernels/linear.py
        self._grad_pending_zero = False

    @property
    def grad(self):
        if self._grad_pending_zero:
            self._grad.fill(0)
            self._grad_pending_zero = False
        return self._grad

    @grad.setter
    def grad(self, value):
        self._grad = value
        self._grad_pending_zero = False

    @property
    def shape(self):
        return self.data.shape

    def zero_grad(self):
        self._grad_pending_zero = True

    def __repr__(self):
        return f"Parameter(shape={self.data.shape}, dtype={self.data.dtype})"


def grads_for_backward(*params):
    """The gradient arrays of `params` (None entries stay None) and whether a backward pass must
    add into them. When every one was zeroed since the last backward the pass may overwrite
    them (accumulate=False); otherwise pending zeros are materialised and it adds."""
    live = [p for p in params if p is not None]
    if live and all(p._grad_pending_zero for p in live):
        for p in live:
            p._grad_pending_zero = False
        return [None if p is None else p._grad for p in params], False
    return [None if p is None else p.grad for p in params], True


PRECISIONS = ("fp32", "bf16")


class Module:
    """Base class of every layer and model.

    Between forward and backward a layer holds exactly the values its class names in `saved`
    (forward stores them with `save`, backward takes them with `take`, which frees them), so a
    reader sees in one line what each layer costs in memory between the two passes.
    """

    saved = ()  # names of the values forward keeps for backward

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)
        object.__setattr__(self, "precision", "fp32")
        object.__setattr__(self, "_saved", None)
        object.__setattr__(self, "_backward_hooks", [])

    def __setattr__(self, name, value):
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        elif name in self._buffers:
            self._buffers[name] = value
        object.__setattr__(self, name, value)

    def register_buffer(self, name, array):
        self._buffers[name] = array
        object.__setattr__(self, name, array)

    # -- the computation --------------------------------------------------------------
    def forward(self, x):
        raise NotImplementedError(f"{type(self).__name__} has no forward")

    def backward(self, grad_out, need_input_grad=True):
        """Accumulate the parameters' gradients and return the input gradient. A layer may
        return None instead when need_input_grad is False (nothing upstream needs it: the
        network's first layer), and skip computing it."""
        raise NotImplementedError(f"{type(self).__name__} has no backward")

    def save(self, **values):
        """Keep `values` for backward; their names must be exactly the class's `saved`."""
        if set(values) != set(self.saved):
            raise TypeError(f"{type(self).__name__}.forward saves {sorted(values)}, but the class "
                            f"declares saved = {tuple(self.saved)}")
        object.__setattr__(self, "_saved", values)

    def take(self):
        """The values forward saved, in the order of `saved`, released from the layer.
        RuntimeError when there are none: backward without a forward, or twice for one."""
        values = self._saved
        if values is None:
            raise RuntimeError(f"{type(self).__name__}.backward called without a forward "
                               f"(or a second time for one forward)")
        object.__setattr__(self, "_saved", None)
        return tuple(values[name] for name in self.saved)

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def register_backward_hook(self, hook):
        """Call hook(module) each time this module's backward has finished, when the gradients of
        its own parameters are final for the step (the container running it calls the hooks).
        Data-parallel training starts each bucket's all-reduce from here. Returns a remover."""
        self._backward_hooks.append(hook)
        return lambda: self._backward_hooks.remove(hook)

    def backward_done(self):
        """Run the backward hooks; called by a container after this child's backward."""
        for hook in self._backward_hooks:
            hook(self)

    def output_shape(self, input_shape):
        """Shape of forward's output for an input of `input_shape` (no computation)."""
        return tuple(input_shape)

    def macs(self, input_shape):
        """Multiply-accumulates of one forward pass on `input_shape`."""
        return 0

    # -- traversal ----------------------------------------------------------------------
    def children(self):
        return iter(self._modules.values())

    def named_modules(self, prefix=""):
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self):
        for _, m in self.named_modules():
            yield m

    def named_parameters(self, prefix=""):
        for name, p in self._parameters.items():
            yield (f"{prefix}.{name}" if prefix else name), p
        for cname, child in self._modules.items():
            yield from child.named_parameters(f"{prefix}.{cname}" if prefix else cname)

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def named_buffers(self, prefix=""):
        for name, b in self._buffers.items():
            yield (f"{prefix}.{name}" if prefix else name), b
        for cname, child in self._modules.items():
            yield from child.named_buffers(f"{prefix}.{cname}" if prefix else cname)

    # -- modes and grads ----------------------------------------------------------------
    def train(self, mode=True):
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self):
        return self.train(False)

    def to_precision(self, precision):
        """Arithmetic of the convolution and linear layers: "fp32", or "bf16" (products of
        operands rounded to bfloat16, summed in float32; parameters, gradients, optimiser state,
        the loss and the other layers stay float32). Like train(), set on every submodule."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        for m in self.modules():
            object.__setattr__(m, "precision", precision)
        return self

    def zero_grad(self):
        for p in self.parameters():
            p.zero_grad()

    def to(self, dtype):
        """Cast parameters and floating buffers to `dtype` (float64 for gradient checks)."""
        dtype = np.dtype(dtype)
        for m in self.modules():
            for name, p in m._parameters.items():
                p.data = np.ascontiguousarray(p.data, dtype=dtype)
                p.grad = aligned_zeros_like(p.data)
            for name, b in list(m._buffers.items()):
                if b is not None and np.issubdtype(b.dtype, np.floating):
                    m.register_buffer(name, b.astype(dtype))
        return self

    # -- state ----------------------------------------------------------------------------
    def _state_items(self, prefix=""):
        # PyTorch's order: a module's own parameters, then its own buffers, then its children.
        for name, p in self._parameters.items():
            yield (f"{prefix}{name}"), p.data
        for name, b in self._buffers.items():
            yield (f"{prefix}{name}"), b
        for cname, child in self._modules.items():
            yield from child._state_items(f"{prefix}{cname}.")

    def state_dict(self):
        """OrderedDict of name -> array (copies), with torchvision's keys for torchvision models."""
        return OrderedDict((k, np.array(v, copy=True)) for k, v in self._state_items())

    def load_state_dict(self, state_dict, strict=True):
        """Copy arrays into parameters and buffers.

        Raises ValueError listing missing and unexpected keys (when strict) and every shape mismatch.
        Returns (missing_keys, unexpected_keys).
        """
        targets = OrderedDict()
        for m_prefix, m in self.named_modules():
            pre = f"{m_prefix}." if m_prefix else ""
            for name in m._parameters:
                targets[pre + name] = (m, name, "param")
            for name in m._buffers:
                targets[pre + name] = (m, name, "buffer")
        missing = [k for k in targets if k not in state_dict]
        unexpected = [k for k in state_dict if k not in targets]
        mismatched = []
        for k, (m, name, kind) in targets.items():
            if k in state_dict:
                have = m._parameters[name].data.shape if kind == "param" else np.shape(m._buffers[name])
                got = np.shape(state_dict[k])
                if tuple(have) != tuple(got):
                    mismatched.append(f"{k}: expected {tuple(have)}, got {tuple(got)}")
        problems = []
        if strict and missing:
            problems.append("missing keys: " + ", ".join(missing))
        if strict and unexpected:
            problems.append("unexpected keys: " + ", ".join(unexpected))
        if mismatched:
            problems.append("shape mismatch: " + "; ".join(mismatched))
        if problems:
            raise ValueError("state_dict does not fit the model: " + " | ".join(problems))
        for k, (m, name, kind) in targets.items():
            if k not in state_dict:
                continue
            value = np.asarray(state_dict[k])
            if kind == "param":
                p = m._parameters[name]
                p.data[...] = value.astype(p.data.dtype, copy=False)
            else:
                old = m._buffers[name]
                m.register_buffer(name, np.array(value, dtype=old.dtype, copy=True))
        return missing, unexpected

    # -- printing -------------------------------------------------------------------------
    def extra_repr(self):
        return ""

    def __repr__(self):
        if not self._modules:
            return f"{type(self).__name__}({self.extra_repr()})"
        lines = [f"{type(self).__name__}("]
        for name, child in self._modules.items():
            body = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {body}")
        lines.append(")")
        return "\n".join(lines)


class Identity(Module):
    def forward(self, x):
        return x

    def backward(self, grad_out, need_input_grad=True):
        return grad_out
