"""Evaluation and prediction with a model: accuracy over a loader, a checkpoint on a list, top-k of
images, and the confusion matrix as text. A checkpoint may be float or int8 (`minialex quantize`):
`model_from_checkpoint` gives a model with the same interface either way.

Class names come from checkpoints, which may come from strangers: every name printed goes through
`errors.printable`, so a file cannot put terminal escapes on the screen.
"""
import numpy as np

from .checkpoint import load_checkpoint, model_from_checkpoint
from .errors import DataError, printable
from .files import check_input_file
from .run import check_images_exist, check_int8, set_threads


def softmax(logits):
    """Row-wise softmax in float64 (probabilities to print, not the model's arithmetic)."""
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def evaluate(model, loader, num_classes, loss_fn=None, max_batches=None, world=None):
    """{"loss", "top1", "top5", "n", "confusion"} over the loader (or its first batches), in eval mode.

    With a `world` of several processes each evaluates its shard of every batch and the counts,
    loss sums and confusion matrix are summed over all of them."""
    from .nn import CrossEntropyLoss
    loss_fn = loss_fn or CrossEntropyLoss()
    model.eval()
    k = min(5, num_classes)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    loss_sum, top1, topk, n = 0.0, 0, 0, 0
    from .distributed import World
    world = world or World()
    for batch, (x, y) in enumerate(world.agreed(loader), 1):
        if len(y):   # a process's shard of a short last batch may be empty
            logits = model(x)
            loss_sum += float(loss_fn(logits, y)) * len(y)
            pred = np.argmax(logits, axis=1)
            best = np.argpartition(-logits, k - 1, axis=1)[:, :k]
            top1 += int((pred == y).sum())
            topk += int((best == y[:, None]).any(axis=1).sum())
            np.add.at(confusion, (y, pred), 1)
            n += len(y)
        if max_batches is not None and batch >= max_batches:
            break
    if world.distributed:
        totals = world.allreduce_(np.array([loss_sum, top1, topk, n], dtype=np.float64))
        loss_sum, top1, topk, n = float(totals[0]), int(totals[1]), int(totals[2]), int(totals[3])
        world.allreduce_(confusion)
    n_safe = max(n, 1)
    return {"loss": loss_sum / n_safe, "top1": top1 / n_safe, "top5": topk / n_safe, "n": n,
            "confusion": confusion}


def eval_transform(ckpt):
    """The evaluation preprocessing a checkpoint was trained for."""
    from .data import EvalTransform
    n = ckpt.normalization
    return EvalTransform(int(n["crop"]), int(n["resize"]), n["mean"], n["std"])


def run_eval(list_path, weights, batch_size=32, workers=2, threads=None):
    """Load `weights`, evaluate on `list_path`; returns (checkpoint, evaluate() result).

    Under mpiexec every process evaluates its share of each batch and the results are summed."""
    from . import distributed
    from .data import DataLoader, read_list
    world = distributed.world()

    def prepare():
        set_threads(threads, world)
        ckpt = load_checkpoint(weights, int8=True)   # a float or an int8 checkpoint alike
        if ckpt.int8 is not None:
            check_int8()
        samples = check_images_exist(read_list(list_path, len(ckpt.class_names)), list_path)
        return ckpt, model_from_checkpoint(ckpt), samples

    ckpt, model, samples = world.collectively(prepare)
    loader = DataLoader(samples, eval_transform(ckpt), batch_size, shuffle=False, num_workers=workers,
                        on_bad_image="error", shard=(world.rank, world.size))
    return ckpt, evaluate(model, loader, len(ckpt.class_names), world=world)


def format_confusion(confusion, class_names, max_classes=20):
    """Text confusion matrix (rows: true class, columns: predicted), or the worst classes if large."""
    c = len(class_names)
    per_class = confusion.diagonal() / np.maximum(confusion.sum(axis=1), 1)
    if c > max_classes:
        lines = [f"{c} classes: the {max_classes} with the lowest accuracy (true class, accuracy, images)"]
        present = np.flatnonzero(confusion.sum(axis=1))
        for i in present[np.argsort(per_class[present], kind="stable")][:max_classes]:
            lines.append(f"  {i:>5} {printable(class_names[i], 30)[:30]:<30} {per_class[i]:7.2%} "
                         f"{confusion[i].sum():>7}")
        return "\n".join(lines)
    width = max(5, len(str(confusion.max())) + 1)
    names = [printable(n, 14)[:14] for n in class_names]
    label_w = max(len(n) for n in names) + 6
    header = " " * label_w + "".join(f"{i:>{width}}" for i in range(c)) + "   accuracy"
    lines = ["confusion matrix (rows: true class, columns: predicted class id)", header]
    for i in range(c):
        row = "".join(f"{v:>{width}}" for v in confusion[i])
        lines.append(f"{i:>3} {names[i]:<{label_w - 4}}{row}   {per_class[i]:.2%}")
    return "\n".join(lines)


def predict(image_paths, weights, topk=5, threads=None, batch_size=16):
    """[(path, [(class_id, name, probability), ...])] for each image, best first."""
    from .data import load_image
    set_threads(threads)
    ckpt = load_checkpoint(weights, int8=True)   # a float or an int8 checkpoint alike
    if ckpt.int8 is not None:
        check_int8()
    model = model_from_checkpoint(ckpt)
    transform = eval_transform(ckpt)
    for p in image_paths:
        check_input_file(p, "image", DataError)
    k = max(1, min(int(topk), len(ckpt.class_names)))
    results = []
    for i in range(0, len(image_paths), batch_size):
        chunk = image_paths[i:i + batch_size]
        x = np.stack([transform(load_image(p)) for p in chunk])
        probs = softmax(model(x))
        for p, row in zip(chunk, probs):
            order = np.argsort(-row, kind="stable")[:k]
            results.append((p, [(int(c), ckpt.class_names[c], float(row[c])) for c in order]))
    return results


def format_predictions(results):
    """The lines `minialex inference` prints: each path, then its top-k classes."""
    lines = []
    for path, top in results:
        lines.append(printable(path, 300))
        lines.extend(f"  {prob:8.2%}  {printable(name, 80)} ({class_id})" for class_id, name, prob in top)
    return "\n".join(lines)


__all__ = ["evaluate", "run_eval", "predict", "format_confusion", "format_predictions", "eval_transform",
           "softmax"]
