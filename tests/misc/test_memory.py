"""The allocator tuning done on import: applied on glibc, skippable by environment."""
import os
import subprocess
import sys

import pytest

from minialex._memory import keep_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_applied_on_linux_and_honours_the_opt_out(monkeypatch):
    assert keep_freed_memory() is True
    monkeypatch.setenv("MINIALEX_MALLOC", "system")
    assert keep_freed_memory() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_freed_large_buffers_are_reused_without_new_page_faults():
    code = (
        "import resource, numpy as np\n"
        "from minialex._memory import keep_freed_memory\n"
        "keep_freed_memory()\n"   # where training and the benchmarks start; import alone does not
        "def touch():\n"
        "    a = np.empty(64 << 18, np.float32); a.fill(1.0)\n"  # 64 MB
        "touch()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(5): touch()\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")
    def faults(env):
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, **env})
        return int(run.stdout.strip())

    # fresh mmap()s fault on every page (or huge page) again; reused heap memory does not
    untuned = faults({"MINIALEX_MALLOC": "system"})
    tuned = faults({})
    assert untuned > 100
    assert tuned < untuned / 10
