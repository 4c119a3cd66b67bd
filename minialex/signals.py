"""SIGINT and SIGTERM as a flag the training loop reads between batches.

The first signal asks the loop to stop after the batch in progress and save; a second one raises
KeyboardInterrupt at once (quit without saving). The exit status is 128 + the signal number (130,
143), what shells report for a process those signals ended.
"""
import signal
import threading

from .progress import say


class SignalStop:
    """Turn SIGINT/SIGTERM into a flag checked between batches; a second signal aborts at once."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        say("stopping after this batch and saving (signal again to quit without saving)")

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False

    @property
    def exit_code(self):
        return 128 + int(self.signum)

    @property
    def name(self):
        return signal.Signals(self.signum).name
