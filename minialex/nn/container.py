"""Sequential: layers applied in order, backward in reverse, with Conv2d→ReLU fused."""
from .activation import ReLU
from .conv import Conv2d
from .linear import Linear
from .module import Module


class Sequential(Module):
    """Layers applied in order; backward runs them in reverse. Children are named "0", "1", ...

    A Conv2d directly followed by a ReLU runs as one fused layer: the convolution writes the
    rectified output in the pass that adds its bias, and its backward masks the gradient in
    the pass that sums the bias gradient — two passes over the largest activations saved per
    pair. Results are identical; the ReLU module keeps its place (and torchvision's indices).
    """

    def __init__(self, *layers):
        super().__init__()
        for i, layer in enumerate(layers):
            setattr(self, str(i), layer)
        self._plan = None

    def __getitem__(self, i):
        layers = list(self._modules.values())
        if isinstance(i, slice):
            return Sequential(*layers[i])
        return layers[i]

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def _steps(self):
        """[(layer,) or (conv, relu)] in forward order."""
        layers, steps, i = list(self._modules.values()), [], 0
        while i < len(layers):
            if (type(layers[i]) is Conv2d and i + 1 < len(layers) and type(layers[i + 1]) is ReLU):
                steps.append((layers[i], layers[i + 1]))
                i += 2
            else:
                steps.append((layers[i],))
                i += 1
        return steps

    def forward(self, x):
        steps = self._steps()
        for step in steps:
            x = step[0].forward_relu(x) if len(step) == 2 else step[0](x)
        self._plan = steps
        return x

    def backward(self, grad_out, need_input_grad=True):
        """Runs the layers' backward in reverse; returns the input gradient, or None when
        need_input_grad is False and the first layer can skip computing it."""
        if self._plan is None:
            raise RuntimeError("Sequential.backward called before forward")
        steps = self._plan
        for i in range(len(steps) - 1, -1, -1):
            layer = steps[i][0]
            if i == 0 and not need_input_grad and isinstance(layer, (Conv2d, Linear, Sequential)):
                grad_out = layer.backward(grad_out, need_input_grad=False)
            else:
                grad_out = layer.backward(grad_out)
        self._plan = None
        return grad_out

    def output_shape(self, input_shape):
        for layer in self._modules.values():
            input_shape = layer.output_shape(input_shape)
        return input_shape

    def macs(self, input_shape):
        total = 0
        for layer in self._modules.values():
            total += layer.macs(input_shape)
            input_shape = layer.output_shape(input_shape)
        return total
