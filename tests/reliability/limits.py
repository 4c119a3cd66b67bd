"""Running memory-hungry cases in a child process under an address-space limit, so that a
regression fails its test (MemoryError, or the child killed) instead of exhausting the machine."""
import os
import resource
import subprocess
import sys

from .conftest import REPO


def _limit(megabytes):
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (megabytes << 20, megabytes << 20))
    return apply


def _env():
    return dict(os.environ, NUMBA_NUM_THREADS="2",
                PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))


def run_cli_limited(args, cwd, megabytes=1500, timeout=120):
    """`python -m minialex ARGS` with at most `megabytes` of address space."""
    return subprocess.run([sys.executable, "-m", "minialex", *map(str, args)], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=timeout, preexec_fn=_limit(megabytes))


def run_python_limited(code, cwd, megabytes=1000, timeout=120):
    """`python -c CODE` with at most `megabytes` of address space."""
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=timeout, preexec_fn=_limit(megabytes))
