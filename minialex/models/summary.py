"""The model table: each layer's output shape, parameters and multiply-accumulates."""
from ..errors import printable


def summary(model, input_shape, file=None, print_table=True):
    """Print (to `file`, default stdout) and return one row per leaf layer:
    {"name", "layer", "output_shape", "params", "macs"}; the totals follow the rows.

    Walks the children in the order they are declared, which for Sequential and AlexNet is
    the order forward runs them."""
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
        rows.append({"name": prefix, "layer": type(module).__name__, "output_shape": tuple(out),
                     "params": int(params), "macs": int(module.macs(shape))})
        shape = out

    walk(model, "")
    total_params = sum(r["params"] for r in rows)
    total_macs = sum(r["macs"] for r in rows)
    if print_table:
        import sys
        out = file or sys.stdout
        header = f"{'layer':<16}{'type':<20}{'output shape':<22}{'params':>14}{'MACs':>18}"
        print(header, file=out)
        print("-" * len(header), file=out)
        for r in rows:
            print(f"{printable(r['name'], 15):<16}{printable(r['layer'], 19):<20}{str(r['output_shape']):<22}{r['params']:>14,}{r['macs']:>18,}", file=out)
        print("-" * len(header), file=out)
        print(f"{'total':<58}{total_params:>14,}{total_macs:>18,}", file=out)
    return rows
