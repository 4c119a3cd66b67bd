"""Weights in from PyTorch, models out to ONNX and TensorRT, and a layer-by-layer check against PyTorch.

    minialex convert alexnet.pth w.npz [-arch torchvision] [-labels names.txt]
    minialex export w.npz model.onnx        (or model.wts; the extension picks the format)
    minialex compare -load w.npz -torch alexnet.pth -input photo.jpeg

Library use: `read_torch_state_dict`, `convert_torch_file` (convert.py), `export_onnx`
(onnx_export.py), `write_wts` / `read_wts` (wts.py), `compare_files` / `compare_models`
(compare.py), and `export_checkpoint` below.

Only the standard library is imported here, so that the command line can register these
commands without loading NumPy, Numba, onnx or torch; each command imports what it uses.
"""
import os

from minialex.config import ARCHS, add_option

EXPORT_FORMATS = {".onnx": "ONNX", ".wts": "TensorRT .wts"}
# Largest input side an exported graph may declare (AlexNet's is 224 or 227).


def export_checkpoint(src, dst):
    """Export checkpoint `src` to `dst`, in the format named by dst's extension (.onnx or .wts).

    A target that cannot be written (a folder, a FIFO, a device) is refused before `src` is read.
    An int8 checkpoint (minialex quantize) goes to ONNX as QDQ; .wts holds float weights only.
    """
    from minialex.checkpoint import load_checkpoint, model_from_checkpoint
    from minialex.errors import MinialexError
    from minialex.files import check_output_target
    ext = os.path.splitext(os.fspath(dst))[1].lower()
    check_output_target(dst, f"{EXPORT_FORMATS.get(ext, 'export')} file")
    if ext not in EXPORT_FORMATS:
        raise MinialexError(f"{dst}: unknown export format {ext or '(no extension)'!r}; "
                            f"name the output *.onnx or *.wts")
    ckpt = load_checkpoint(src, int8=ext == ".onnx")
    if ext == ".wts":   # the weights as stored, under their torchvision names
        from minialex.interop.wts import write_wts
        write_wts(ckpt.state_dict, dst)
        return
    model = model_from_checkpoint(ckpt)   # the reader has checked arch.input_size against the variant
    from minialex.interop.onnx_export import export_onnx
    export_onnx(model, dst, ckpt.arch["input_size"], class_names=ckpt.class_names,
                normalization=ckpt.normalization)


# -- command line: each function adds one sub-command to the `minialex` parser ------------------

def convert_parser(sub):
    p = sub.add_parser("convert", help="PyTorch AlexNet weights (.pth) -> minialex checkpoint",
                       description="Convert a torch.save'd AlexNet state_dict (zip or legacy format, or a "
                                   "dict holding it under 'state_dict'/'model') into a checkpoint. The file's "
                                   "pickle is read with an allow-list: only tensors and dicts, nothing runs. "
                                   "torch need not be installed.")
    p.add_argument("src", metavar="SRC.pth")
    p.add_argument("dst", metavar="DST.npz")
    add_option(p, "arch", choices=ARCHS, default="torchvision", help="AlexNet variant of the weights "
                                                               "(default torchvision)")
    add_option(p, "labels", metavar="F", help="labels file of 'class_id name' lines (default: the 1,000 "
                                        "ImageNet names when the model has 1,000 classes, else class_<id>)")
    p.set_defaults(run=_run_convert)


def _run_convert(a):
    from minialex.errors import printable
    from minialex.interop.convert import convert_torch_file
    arch = convert_torch_file(a.src, a.dst, arch=a.arch, labels=a.labels)
    names = "names from " + a.labels if a.labels else (
        "ImageNet names" if arch["num_classes"] == 1000 else "names class_<id>")
    bn = ", batch norm" if arch["batch_norm"] else ""
    # Paths are the user's, but may hold terminal escapes all the same.
    print(printable(f"wrote {a.dst}: AlexNet {arch['variant']}{bn}, {arch['num_classes']} classes "
                    f"({names})", None))
    return 0


def export_parser(sub):
    p = sub.add_parser("export", help="checkpoint -> ONNX (.onnx) or TensorRT weights (.wts)",
                       description="Export a checkpoint. DST's extension picks the format: .onnx writes an "
                                   "inference graph (needs the onnx package), input 'input' (N,3,S,S) float32, "
                                   "output 'logits'; .wts writes tensorrtx's text weights, torchvision names.")
    p.add_argument("src", metavar="SRC.npz")
    p.add_argument("dst", metavar="DST.onnx|DST.wts")
    p.set_defaults(run=_run_export)


def _run_export(a):
    from minialex.errors import printable
    export_checkpoint(a.src, a.dst)
    ext = os.path.splitext(a.dst)[1].lower()
    print(printable(f"wrote {a.dst} ({EXPORT_FORMATS[ext]})", None))
    return 0


def compare_parser(sub):
    p = sub.add_parser("compare", help="per-layer differences against PyTorch (needs torch)",
                       description="Run one image through the checkpoint and through a torch.nn AlexNet "
                                   "holding the .pth weights; print the sum and max |difference| after every "
                                   "layer. Exit status 1 when some layer differs by more than 1e-4 of its "
                                   "largest activation.")
    add_option(p, "load", required=True, metavar="W", help="minialex checkpoint")
    add_option(p, "torch", required=True, metavar="F.pth", help="PyTorch state_dict of the same architecture")
    add_option(p, "input", required=True, metavar="IMG", help="image, prepared with the checkpoint's "
                                                        "resize, crop and normalisation")
    p.set_defaults(run=_run_compare)


def _run_compare(a):
    from minialex.interop.compare import compare_files
    rows = compare_files(a.load, a.torch, a.input)
    return 0 if all(r.agrees for r in rows) else 1


PARSERS = (convert_parser, export_parser, compare_parser)


def register(sub):
    """Add convert, export and compare to the `minialex` sub-command parsers `sub`."""
    for add in PARSERS:
        add(sub)
