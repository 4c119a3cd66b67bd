"""The per-batch progress report of an epoch: a tqdm bar on a terminal (when tqdm is installed),
otherwise a plain status line at most every 30 seconds, which suits log files."""
import sys
import time


# False on every process of a data-parallel run but rank 0, which alone reports.
speaking = True


def say(message):
    """A status line on stderr: how a run reports anything besides its epoch lines."""
    if speaking:
        print(f"minialex: {message}", file=sys.stderr, flush=True)


def show(line):
    """A result line on stdout (an epoch's summary), from the reporting process only."""
    if speaking:
        print(line, flush=True)


class Progress:
    """tqdm bar on a terminal; otherwise a plain status line at most every `every` seconds."""

    def __init__(self, total, desc):
        self.total, self.desc = total, desc
        self.start = time.perf_counter()
        self.last = self.start
        self.bar = None
        tty = sys.stderr.isatty()
        self.tty = tty
        self.every = 0.5 if tty else 30.0
        if tty:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc=desc, unit="batch", file=sys.stderr, leave=False,
                                dynamic_ncols=True, mininterval=0.5)
            except ImportError:
                pass

    def update(self, done, images, loss, acc):
        if not speaking:
            return
        now = time.perf_counter()
        rate = images / max(now - self.start, 1e-9)
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f} acc {acc:.1%} {rate:.0f} img/s", refresh=False)
            self.bar.update(1)
            return
        # Off a terminal (a log file), only every `every` seconds: the epoch line sums it up anyway.
        if now - self.last >= self.every or (done == self.total and self.tty):
            self.last = now
            eta = (now - self.start) / done * (self.total - done)
            end = "\r" if self.tty else "\n"
            sys.stderr.write(f"{self.desc} {done}/{self.total} loss {loss:.4f} acc {acc:.1%} "
                             f"{rate:.0f} img/s ETA {eta:.0f}s   {end}")
            sys.stderr.flush()

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.tty:
            sys.stderr.write("\n")
