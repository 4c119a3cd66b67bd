"""Test helpers shared by the kernel and module tests.

Gradient checking works in float64 on a scalar function f(*arrays). Small inputs get a full
central-difference gradient (every element perturbed); larger ones are checked along random
directions: (f(x + h v) - f(x - h v)) / 2h must equal sum(grad * v), which catches any wrong
element of the gradient with probability one while costing two evaluations per direction.
"""
import os
import subprocess
import sys

import numpy as np


def numeric_grad(f, arrays, index, eps=1e-6):
    """Central-difference gradient of scalar f(*arrays) with respect to arrays[index] (in place,
    restored afterwards)."""
    x = arrays[index]
    g = np.zeros_like(x, dtype=np.float64)
    flat = x.reshape(-1)
    gflat = g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        fp = f(*arrays)
        flat[i] = old - eps
        fm = f(*arrays)
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * eps)
    return g


def directional_derivative(f, arrays, directions, eps=1e-6):
    """(f(a + eps*v) - f(a - eps*v)) / (2 eps), with all arrays moved along their direction."""
    plus = [a + eps * v if v is not None else a for a, v in zip(arrays, directions)]
    minus = [a - eps * v if v is not None else a for a, v in zip(arrays, directions)]
    return (f(*plus) - f(*minus)) / (2 * eps)


def check_grads(f, arrays, grads, eps=1e-6, rtol=1e-5, atol=1e-8, max_full=400, n_dirs=3, seed=0):
    """Assert that grads[i] is the gradient of scalar f(*arrays) w.r.t. arrays[i].

    arrays: float64 arrays (checked; f works on copies). grads: same length, None where an input is
    not checked. Inputs of at most max_full elements get a full central-difference gradient,
    larger ones n_dirs random-direction derivatives (each direction checks all grads at once).
    """
    for i, (a, g) in enumerate(zip(arrays, grads)):
        if g is not None:
            # Checked on the caller's arrays: a float32 input would make central differences
            # of step 1e-6 mostly rounding noise, whatever copy is made here.
            assert isinstance(a, np.ndarray) and a.dtype == np.float64, \
                f"gradient checks run in float64, input {i} is {getattr(a, 'dtype', type(a).__name__)}"
            assert g.shape == a.shape, f"gradient shape {g.shape} != input shape {a.shape}"
    arrays = [a.copy() if isinstance(a, np.ndarray) else a for a in arrays]  # f may not modify ours
    total = sum(a.size for a, g in zip(arrays, grads) if g is not None)
    if total <= max_full:
        for i, g in enumerate(grads):
            if g is None:
                continue
            num = numeric_grad(f, arrays, i, eps)
            np.testing.assert_allclose(g, num, rtol=rtol, atol=atol,
                                       err_msg=f"gradient of input {i} differs from central differences")
        return
    rng = np.random.default_rng(seed)
    for _ in range(n_dirs):
        dirs = [rng.standard_normal(a.shape) if g is not None else None for a, g in zip(arrays, grads)]
        num = directional_derivative(f, arrays, dirs, eps)
        ana = sum(float(np.sum(g * v)) for g, v in zip(grads, dirs) if g is not None)
        scale = sum(float(np.sum(np.abs(g * v))) for g, v in zip(grads, dirs) if g is not None)
        assert abs(num - ana) <= atol + rtol * max(abs(num), scale), \
            f"directional derivative {num!r} != analytic {ana!r}"


def rand(rng, shape, dtype=np.float64, scale=1.0):
    """Standard-normal array of the given dtype."""
    return (rng.standard_normal(shape) * scale).astype(dtype)


def distinct(rng, shape, dtype=np.float64, gap=0.1):
    """Values at least `gap` apart (a shuffled grid plus jitter), so max / relu style kernels
    have no near-ties that a finite-difference step could flip."""
    n = int(np.prod(shape))
    v = (rng.permutation(n) - n / 2) * gap + rng.uniform(-gap / 4, gap / 4, n)
    return v.reshape(shape).astype(dtype)


def tol(dtype):
    """(rtol, atol) for comparing a kernel with its reference in the given dtype."""
    return (1e-10, 1e-12) if np.dtype(dtype) == np.float64 else (2e-5, 2e-6)


def assert_close(actual, expected, dtype=None, rtol=None, atol=None):
    r, a = tol(dtype if dtype is not None else np.asarray(actual).dtype)
    np.testing.assert_allclose(actual, expected, rtol=r if rtol is None else rtol,
                               atol=a if atol is None else atol)


def to_torch(torch, a, grad=False):
    """A torch tensor copy of a numpy array (requires_grad when grad)."""
    t = torch.from_numpy(np.array(a))
    if grad:
        t.requires_grad_(True)
    return t


def assert_user_error(result, *fragments):
    """A CLI result that is a user error: exit 2, exactly one `minialex: error:` line (the last
    line of stderr), no traceback, naming each fragment. Returns the error line."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("minialex: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def record_im2col_chunks(monkeypatch, module):
    """Wrap `module.im2col` (as the batched convolution calls it) to record, per call, the batch
    rows it was given as (first image index, image count) and the size in bytes of the whole
    buffer its output lives in. Returns the list the records are appended to."""
    calls = []
    inner = module.im2col

    def im2col(x, *args, out=None, **kw):
        base = x
        while base.base is not None and isinstance(base.base, np.ndarray):
            base = base.base
        start = (x.__array_interface__["data"][0] - base.__array_interface__["data"][0]) // max(1, x[0].nbytes)
        buffer = out
        while buffer is not None and isinstance(buffer.base, np.ndarray):
            buffer = buffer.base
        calls.append((int(start), x.shape[0], None if buffer is None else buffer.nbytes))
        return inner(x, *args, out=out, **kw)

    monkeypatch.setattr(module, "im2col", im2col)
    return calls


# -- the command line in a subprocess -------------------------------------------------------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The cifar variant on 16 demo images: an epoch is two batches, so checkpoints come often.
FAST = ["-arch", "cifar", "-batchsize", "8", "-threads", "1", "-workers", "1", "-seed", "5"]


def cli_env(**extra):
    """The environment a command-line child runs in: this checkout first on the path, 2 threads."""
    return dict(os.environ, NUMBA_NUM_THREADS="2",
                PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]), **extra)


def run_cli(args, cwd, timeout=120, env=None):
    """`python -m minialex ARGS` as a user runs it; a hang fails the test through the timeout."""
    return subprocess.run([sys.executable, "-m", "minialex", *map(str, args)], cwd=cwd,
                          env=cli_env(**(env or {})), capture_output=True, text=True, timeout=timeout)


def popen_cli(args, cwd, **kw):
    return subprocess.Popen([sys.executable, "-m", "minialex", *map(str, args)], cwd=cwd, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def write_list(path, samples):
    path.write_text("".join(f"{s.label} {s.path}\n" for s in samples))
    return path
