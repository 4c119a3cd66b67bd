"""Sequential: layers applied in order, backward in reverse, with the ReLU fusions the model declares."""
from .activation import ReLU
from .module import Module


class Sequential(Module):
    """Layers applied in order; backward runs them in reverse. Children are named "0", "1", ...

    `fuse_relu(i)` declares that layer i applies the ReLU at i + 1 itself (through its
    `forward_relu`): a convolution then writes the rectified output in the pass that adds its
    bias, and its backward masks the gradient in the pass that sums the bias gradient — two
    passes over the largest activations saved per pair. Results are identical, and the ReLU
    module keeps its place (and torchvision's indices). Nothing is fused unless declared.

    Keeps for backward: the steps the forward ran, so backward replays exactly those.
    """

    saved = ("steps",)

    def __init__(self, *layers):
        super().__init__()
        for i, layer in enumerate(layers):
            setattr(self, str(i), layer)
        self._fused = set()   # indices i whose layer applies the ReLU at i + 1

    def fuse_relu(self, i):
        """Let layer i apply the ReLU that follows it in one pass (see the class docstring)."""
        layers = list(self._modules.values())
        if not (0 <= i < len(layers) - 1 and hasattr(layers[i], "forward_relu")
                and isinstance(layers[i + 1], ReLU)):
            raise ValueError(f"layer {i} cannot fuse: it needs a forward_relu and a ReLU right after it")
        self._fused.add(i)
        return self

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
        """[(layer,) or (layer, relu) when fused] in forward order."""
        layers, steps, i = list(self._modules.values()), [], 0
        while i < len(layers):
            if i in self._fused:
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
        self.save(steps=steps)
        return x

    def backward(self, grad_out, need_input_grad=True):
        """Runs the layers' backward in reverse; need_input_grad goes to the first layer, which
        may then skip its input gradient and return None."""
        (steps,) = self.take()
        for i in range(len(steps) - 1, -1, -1):
            grad_out = steps[i][0].backward(grad_out, need_input_grad=need_input_grad if i == 0 else True)
            for layer in steps[i]:
                layer.backward_done()
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
