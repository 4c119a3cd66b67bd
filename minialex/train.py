"""The training loop: `run_training(cfg)` prepares a run (run.py) and trains it, epoch by epoch.

Per epoch: train over the shuffled list, evaluate on the validation list, step the learning-rate
schedule, save a checkpoint, print one line (and append it to -log, redraw -plot).

Guards, because a week-long run should fail early and loudly, never silently:
- the first batch's loss of a fresh model is compared with ln(num_classes), what an untrained
  classifier scores; far off means wrong labels or a bad normalisation, and we say so;
- every batch's loss and gradient norm are checked with np.isfinite (in plain NumPy, not in the
  fastmath kernels, where NaN checks may be optimised away); a NaN/inf stops the run before the
  optimiser step, so the last checkpoint on disk stays the last good one;
- SIGINT/SIGTERM are caught and acted on between batches: the model is saved (never half-updated)
  and the run ends with status 130 (SIGINT) or 143 (SIGTERM), as shells report those signals.

Exact resume: the checkpoint keeps the optimiser and scheduler state, the global Generator's state
(dropout masks) and the seed; batches and their augmentation depend only on (seed, epoch, sample),
and the kernels split work the same way at a given thread count, so "2 epochs" and "1 epoch, then
-resume for the 2nd" give bitwise identical weights at the same -threads.
"""
import json
import math
import os
import time

import numpy as np

from ._memory import keep_freed_memory, memory_use
from ._random import per_sample
from .checkpoint import save_checkpoint
from .config import TrainConfig
from .errors import MinialexError
from .evaluation import evaluate
from .progress import Progress, say, show
from .run import Run, prepare_run
from .signals import SignalStop


class Interrupted(Exception):
    """SIGINT/SIGTERM ended the run after saving; exit_code is 130 or 143."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code


class Diverged(MinialexError):
    """The loss or a gradient became NaN/inf."""


def run_training(cfg: TrainConfig) -> dict:
    """Train as `cfg` says; returns the final train_state (epoch, history, best, ...)."""
    keep_freed_memory()
    return fit(prepare_run(cfg))


def fit(run: Run) -> dict:
    """Train a prepared run from its start epoch to cfg.epochs; returns the final train_state."""
    cfg, model, opt, sched, world = run.cfg, run.model, run.optimizer, run.scheduler, run.world
    if run.start_epoch > cfg.epochs:
        say(f"{cfg.resume} has already trained {run.start_epoch - 1} epochs; nothing to do "
            f"(ask for more with -epochs)")
        return run.train_state(run.start_epoch - 1)
    if sched is not None and cfg.schedule == "plateau":
        say(f"-schedule plateau watches the {'validation' if run.val_loader else 'training'} loss "
            f"(patience {cfg.patience} epochs)")
    say(f"training {run.arch['variant']}{' +BN' if run.arch.get('batch_norm') else ''} on "
        f"{len(run.train_loader.samples)} images, {run.num_classes} classes, {cfg.optimizer} lr "
        f"{opt.param_groups[0]['lr']:g}, batch {cfg.batch_size}, "
        f"{'bf16 products, ' if cfg.precision == 'bf16' else ''}epochs {run.start_epoch}..{cfg.epochs}; "
        f"checkpoints to {cfg.save}")

    def save(epoch, **extra):
        if world.is_root:   # the one process that writes
            save_checkpoint(cfg.save, model, optimizer=opt, scheduler=sched, **run.checkpoint_meta(),
                            train_state=run.train_state(epoch, **extra))

    with SignalStop() as stop:
        for epoch in range(run.start_epoch, cfg.epochs + 1):
            run.train_loader.set_epoch(epoch)
            lr = float(opt.param_groups[0]["lr"])
            comm0 = (run.reducer.comm_seconds, run.reducer.wait_seconds) if run.reducer else None
            check = ((lambda loss: _check_first_loss(loss, run.num_classes))
                     if run.fresh and epoch == 1 else None)
            result, done = train_epoch(model, run.loss_fn, opt, run.train_loader, epoch, cfg, stop, check,
                                       world, run.reducer)
            if result is None:
                save(epoch - 1, interrupted={"epoch": epoch, "batch": done})
                raise Interrupted(f"{stop.name} in epoch {epoch} at batch {done}: saved {cfg.save}; "
                                  f"-resume {cfg.save} restarts epoch {epoch}", stop.exit_code)
            train_loss, train_acc, images, seconds = result
            v = (evaluate(model, run.val_loader, run.num_classes, max_batches=cfg.max_batches, world=world)
                 if run.val_loader else None)
            if sched is not None:
                if cfg.schedule == "plateau":
                    sched.step(v["loss"] if v else train_loss)
                else:
                    sched.step()
            if v and (run.best_val_top1 is None or v["top1"] > run.best_val_top1):
                run.best_val_top1 = v["top1"]
            record = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
                      "val_loss": v["loss"] if v else None, "val_top1": v["top1"] if v else None,
                      "val_top5": v["top5"] if v else None, "lr": lr, "time": seconds,
                      "images_per_s": images / max(seconds, 1e-9),
                      "data_wait": run.train_loader.wait_time, "skipped": run.train_loader.skipped,
                      **memory_use()}
            if comm0 is not None:   # gradient all-reduces: their time, and the part backward did not hide
                record["comm_s"] = run.reducer.comm_seconds - comm0[0]
                record["comm_wait_s"] = run.reducer.wait_seconds - comm0[1]
            run.history.append(record)
            save(epoch)
            show(_epoch_line(record, cfg.epochs))
            if cfg.log and world.is_root:
                _append_log(cfg.log, record)
            if cfg.plot and world.is_root:
                from .plot import plot_curves
                plot_curves(run.history, cfg.plot)
            stop.signum = world.step_status(stop.signum, False, 0)[0]   # the same answer everywhere
            if stop.signum is not None:
                raise Interrupted(f"{stop.name} after epoch {epoch}: saved {cfg.save}", stop.exit_code)
    return run.train_state(cfg.epochs)


def grad_norm(params, chunk=1 << 20):
    """Global L2 norm of the gradients, by chunks so that no full-size temporary is made."""
    total = 0.0
    scratch = np.empty(chunk, dtype=np.float64)
    for p in params:
        g = p.grad.reshape(-1)
        for i in range(0, g.size, chunk):
            part = scratch[:min(chunk, g.size - i)]
            np.square(g[i:i + chunk], out=part, dtype=np.float64)
            total += float(part.sum())
    return math.sqrt(total)


def _check_first_loss(loss, num_classes):
    expected = math.log(num_classes)
    if abs(loss - expected) > max(1.0, 0.5 * expected):
        say(f"warning: first batch loss {loss:.3f} is far from ln({num_classes}) = {expected:.3f}, "
             f"what an untrained model should score: check that the class ids in the list match "
             f"the images and that the images are normalised sensibly")


def _diverged(what, epoch, batch, lr, save_path):
    kept = f"{save_path} left as it was" if os.path.exists(save_path) else "nothing saved"
    return Diverged(f"{what} at epoch {epoch}, batch {batch}: training stopped, {kept}; "
                    f"try a lower learning rate (e.g. -lr {lr / 10:g})")


def train_epoch(model, loss_fn, opt, loader, epoch, cfg, stop, first_check, world=None, reducer=None):
    """One pass over the loader; returns ((loss, accuracy, images, seconds), batches done), or
    (None, batches done) when a signal stops it at a batch boundary; raises on bad data or
    divergence.

    In a data-parallel run (`world` of several processes, `reducer` averaging the gradients) every
    process decides with the others, at each batch boundary, whether to go on; the figures returned
    are the global batch's.
    """
    from .distributed import World
    world = world or World()
    model.train()
    params = model.parameters()
    sync_buffers = reducer is not None and not cfg.sync_bn and any(True for _ in model.named_buffers())
    total = len(loader) if cfg.max_batches is None else min(len(loader), cfg.max_batches)
    progress = Progress(total, f"epoch {epoch}/{cfg.epochs}")
    loss_sum, correct, seen, done = 0.0, 0, 0, 0
    start = time.perf_counter()
    batches = iter(loader)
    try:
        while done < total:
            x = y = error = None
            try:
                x, y = next(batches)
            except StopIteration:
                break   # every process has as many batches as the others
            except MinialexError as e:
                error = e
            n = 0 if y is None else len(y)
            signum, failing, global_n = world.step_status(stop.signum, error is not None, n)
            if failing:
                world.raise_first([error])
            if signum is not None:
                stop.signum = signum
                return None, done
            batch = done + 1
            lr = opt.param_groups[0]["lr"]
            if sync_buffers:   # as DDP: batch norm's running statistics are rank 0's
                from .distributed import broadcast_buffers
                broadcast_buffers(model, world)
            opt.zero_grad()
            # An empty share (a short last global batch) still runs forward and backward: with
            # -sync_bn its batch norms take part in the others' all-reduces.
            with per_sample(cfg.seed, epoch, getattr(loader, "batch_indices", None)):
                logits = model(x)   # dropout masks keyed by sample (a plain list of batches: not)
            if n:
                loss = float(loss_fn(logits, y))
                # Several processes find a NaN loss through the gradient norm, which they share.
                if not math.isfinite(loss) and not world.distributed:
                    raise _diverged(f"loss is {loss}", epoch, batch, lr, cfg.save)
                if first_check is not None and done == 0:
                    first_check(loss)
                dloss = loss_fn.backward()
                loss_sum += loss * n
                correct += int((np.argmax(logits, axis=1) == y).sum())
                seen += n
            else:
                dloss = np.zeros_like(logits)
            model.backward(dloss if reducer is None else reducer.scale(dloss, n, global_n))
            if reducer is not None:
                reducer.finish()
            norm = grad_norm(params)
            if not np.isfinite(norm):
                world.raise_everywhere(_diverged(f"gradient norm is {norm}", epoch, batch, lr, cfg.save))
            opt.step()
            done += 1
            progress.update(done, seen, loss_sum / max(seen, 1), correct / max(seen, 1))
    finally:
        progress.close()
    totals = world.allreduce_(np.array([loss_sum, correct, seen], dtype=np.float64))
    loss_sum, correct, seen = float(totals[0]), int(totals[1]), int(totals[2])
    return (loss_sum / max(seen, 1), correct / max(seen, 1), seen, time.perf_counter() - start), done


def _epoch_line(r, epochs):
    val = (f"val loss {r['val_loss']:.4f} top-1 {r['val_top1']:.2%} top-5 {r['val_top5']:.2%}"
           if r.get("val_top1") is not None else "no validation list")
    return (f"epoch {r['epoch']}/{epochs}  train loss {r['train_loss']:.4f} acc {r['train_acc']:.2%}  "
            f"{val}  lr {r['lr']:.3g}  time {r['time']:.1f}s ({r['images_per_s']:.0f} img/s)  "
            f"data wait {r['data_wait']:.1f}s  skipped {r['skipped']}"
            + (f"  all-reduce {r['comm_s']:.1f}s, waited {r['comm_wait_s']:.1f}s" if "comm_s" in r else ""))


def _append_log(path, record):
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise MinialexError(f"{path}: cannot write the log: {e.strerror or e}") from None


__all__ = ["TrainConfig", "Interrupted", "Diverged", "run_training", "fit", "train_epoch", "grad_norm"]
