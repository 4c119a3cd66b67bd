"""The model table: each layer's output shape, parameters and multiply-accumulates, and the
path each convolution takes."""
from ..errors import printable


def conv_paths(conv, input_shape, threads, first):
    """(forward, backward) path a float32 Conv2d takes on input_shape with `threads` threads at
    its precision, from the routing table (nothing is run); the first layer of a network
    computes no input gradient in training."""
    import numpy as np

    from ..kernels.conv import plan
    from ..kernels.conv.layout import geometry
    g = geometry(input_shape, conv.weight.data.shape, conv.stride, conv.padding, conv.groups)
    if g.n == 0:
        return "-", "-"
    return (plan.label(plan.describe("forward", g, np.float32, threads, precision=conv.precision)),
            plan.label(plan.describe("backward", g, np.float32, threads, need_dx=not first,
                                     precision=conv.precision)))


def summary(model, input_shape, file=None, print_table=True, threads=None):
    """Print (to `file`, default stdout) and return one row per leaf layer:
    {"name", "layer", "output_shape", "params", "macs", "paths"}; the totals follow the rows.
    paths: (forward, backward) convolution paths at input_shape's batch on `threads` threads
    (default: Numba's current count), None for other layers.

    Walks the children in the order they are declared, which for Sequential and AlexNet is
    the order forward runs them."""
    from ..nn.conv import Conv2d
    if threads is None:
        import numba
        threads = numba.get_num_threads()
    rows = []
    shape = tuple(input_shape)

    def walk(module, prefix):
        nonlocal shape
        if module._modules:
            for name, child in module._modules.items():
                walk(child, f"{prefix}.{name}" if prefix else name)
            return
        out = module.output_shape(shape)
        params = sum(p.data.size for p in module._parameters.values())
        paths = conv_paths(module, shape, threads, not rows) if isinstance(module, Conv2d) else None
        rows.append({"name": prefix, "layer": type(module).__name__, "output_shape": tuple(out),
                     "params": int(params), "macs": int(module.macs(shape)), "paths": paths})
        shape = out

    walk(model, "")
    total_params = sum(r["params"] for r in rows)
    total_macs = sum(r["macs"] for r in rows)
    if print_table:
        import sys
        out = file or sys.stdout
        header = (f"{'layer':<16}{'type':<20}{'output shape':<22}{'params':>14}{'MACs':>18}"
                  f"  conv path forward / backward ({threads} threads, float32 data, "
                  f"{model.precision} products)")
        print(header, file=out)
        print("-" * len(header), file=out)
        for r in rows:
            paths = f"  {r['paths'][0]} / {r['paths'][1]}" if r["paths"] else ""
            print(f"{printable(r['name'], 15):<16}{printable(r['layer'], 19):<20}{str(r['output_shape']):<22}{r['params']:>14,}{r['macs']:>18,}{paths}", file=out)
        print("-" * len(header), file=out)
        print(f"{'total':<58}{total_params:>14,}{total_macs:>18,}", file=out)
    return rows
