"""The model table: each layer's output shape, parameters and multiply-accumulates."""

def summary(model, input_shape, file=None, print_table=True):
    """Print (to `file`, default stdout) and return one row per leaf layer:
    {"name", "layer", "output_shape", "params", "macs"}; the totals follow the rows."""
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

    if hasattr(model, "features") and hasattr(model, "classifier"):
        # AlexNet flattens between avgpool and classifier without a layer of its own.
        walk(model.features, "features")
        walk(model.avgpool, "avgpool")
        shape = model._flatten.output_shape(shape)
        rows.append({"name": "flatten", "layer": "Flatten", "output_shape": shape, "params": 0, "macs": 0})
        walk(model.classifier, "classifier")
    else:
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
            print(f"{r['name']:<16}{r['layer']:<20}{str(r['output_shape']):<22}{r['params']:>14,}{r['macs']:>18,}", file=out)
        print("-" * len(header), file=out)
        print(f"{'total':<58}{total_params:>14,}{total_macs:>18,}", file=out)
    return rows
