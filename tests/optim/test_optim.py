"""SGD and Adam against their NumPy twins and torch.optim; schedulers against torch's.

Only the comparisons with torch need torch (through the `torch` fixture, which skips without
it); the kernel twins, state dicts, accumulation and argument checks run on the base install."""
import numpy as np
import pytest

from minialex import nn, optim
from minialex.kernels.optim import adam_step, adam_step_ref, sgd_step, sgd_step_ref

SGD_CASES = [
    dict(lr=0.1),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, weight_decay=5e-4),
    dict(lr=0.05, momentum=0.9, dampening=0.3),
    dict(lr=0.05, momentum=0.9, weight_decay=1e-2, nesterov=True),
]
ADAM_CASES = [dict(lr=1e-3), dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2)]


def _run_pair(torch, make_ours, make_torch, steps=5, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(4, 3, 2, 2), (7,), (5, 6)]
    ours = [nn.Parameter(rng.standard_normal(s).astype(np.float32)) for s in shapes]
    theirs = [torch.nn.Parameter(torch.from_numpy(p.data.copy())) for p in ours]
    opt, topt = make_ours(ours), make_torch(theirs)
    for _ in range(steps):
        for p, t in zip(ours, theirs):
            g = rng.standard_normal(p.data.shape).astype(np.float32)
            p.grad[...] = g
            t.grad = torch.from_numpy(g.copy())
        opt.step()
        topt.step()
    for p, t in zip(ours, theirs):
        np.testing.assert_allclose(p.data, t.detach().numpy(), rtol=1e-5, atol=1e-6)
    return opt


@pytest.mark.parametrize("kw", SGD_CASES)
def test_sgd_matches_torch(torch, kw):
    _run_pair(torch, lambda ps: optim.SGD(ps, **kw), lambda ps: torch.optim.SGD(ps, **kw))


@pytest.mark.parametrize("kw", ADAM_CASES)
def test_adam_matches_torch(torch, kw):
    _run_pair(torch, lambda ps: optim.Adam(ps, **kw), lambda ps: torch.optim.Adam(ps, **kw))


def test_kernels_match_numpy_twins_in_float64():
    rng = np.random.default_rng(1)
    p, g = rng.standard_normal(100), rng.standard_normal(100)
    for first in (True, False):
        a, b = p.copy(), p.copy()
        ba, bb = rng.standard_normal(100), None
        bb = ba.copy()
        sgd_step(a, g, ba, 0.1, 0.9, 0.1, 0.01, True, first)
        sgd_step_ref(b, g, bb, 0.1, 0.9, 0.1, 0.01, True, first)
        np.testing.assert_allclose(a, b, rtol=1e-12)
        np.testing.assert_allclose(ba, bb, rtol=1e-12)
    a, b = p.copy(), p.copy()
    ma, va = np.zeros(100), np.zeros(100)
    mb, vb = ma.copy(), va.copy()
    for step in (1, 2, 3):
        adam_step(a, g, ma, va, 1e-2, 0.9, 0.999, 1e-8, 0.1, step)
        adam_step_ref(b, g, mb, vb, 1e-2, 0.9, 0.999, 1e-8, 0.1, step)
    np.testing.assert_allclose(a, b, rtol=1e-12)


def test_optimizer_state_dict_round_trip_continues_identically():
    rng = np.random.default_rng(2)
    make = lambda: [nn.Parameter(np.ones((3, 4), np.float32)), nn.Parameter(np.zeros(4, np.float32))]
    a, b = make(), make()
    oa, ob = optim.Adam(a, lr=0.01), optim.Adam(b, lr=0.01)
    grads = [[rng.standard_normal(p.data.shape).astype(np.float32) for p in a] for _ in range(4)]

    def step(opt, ps, gs):
        for p, g in zip(ps, gs):
            p.grad[...] = g
        opt.step()

    for gs in grads[:2]:
        step(oa, a, gs)
        step(ob, b, gs)
    restored = optim.Adam(b, lr=0.5)
    restored.load_state_dict(ob.state_dict())
    assert restored.param_groups[0]["lr"] == 0.01
    for gs in grads[2:]:
        step(oa, a, gs)
        step(restored, b, gs)
    for p, q in zip(a, b):
        np.testing.assert_array_equal(p.data, q.data)


def test_grads_accumulate_until_zero_grad():
    p = nn.Parameter(np.ones(3, np.float32))
    opt = optim.SGD([p], lr=1.0)
    p.grad += 1
    p.grad += 1
    opt.step()
    np.testing.assert_array_equal(p.data, -np.ones(3))
    opt.zero_grad()
    assert not p.grad.any()


def test_invalid_hyperparameters_are_rejected():
    p = [nn.Parameter(np.ones(2, np.float32))]
    with pytest.raises(ValueError):
        optim.SGD(p, lr=-1)
    with pytest.raises(ValueError):
        optim.SGD(p, lr=0.1, nesterov=True)
    with pytest.raises(ValueError):
        optim.Adam(p, betas=(1.0, 0.9))


def _lrs(opt_ours, sched_ours, opt_torch, sched_torch, epochs, metrics=None):
    got, want = [], []
    for e in range(epochs):
        got.append(opt_ours.param_groups[0]["lr"])
        want.append(opt_torch.param_groups[0]["lr"])
        opt_torch.step()
        if metrics is None:
            sched_ours.step()
            sched_torch.step()
        else:
            sched_ours.step(metrics[e])
            sched_torch.step(metrics[e])
    np.testing.assert_allclose(got, want, rtol=1e-12)


def _our_opt():
    return optim.SGD([nn.Parameter(np.ones(2, np.float32))], lr=0.1, momentum=0.9)


def _pair_opts(torch):
    ours = _our_opt()
    theirs = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1, momentum=0.9)
    return ours, theirs


def test_step_and_multistep_lr_match_torch(torch):
    o, t = _pair_opts(torch)
    _lrs(o, optim.lr_scheduler.StepLR(o, 3, 0.5), t, torch.optim.lr_scheduler.StepLR(t, 3, 0.5), 10)
    o, t = _pair_opts(torch)
    _lrs(o, optim.lr_scheduler.MultiStepLR(o, [2, 5], 0.1),
         t, torch.optim.lr_scheduler.MultiStepLR(t, [2, 5], 0.1), 8)


def test_reduce_on_plateau_matches_torch(torch):
    metrics = [1.0, 0.9, 0.9, 0.91, 0.95, 0.95, 0.8, 0.8, 0.8, 0.8, 0.8, 0.7]
    o, t = _pair_opts(torch)
    _lrs(o, optim.lr_scheduler.ReduceLROnPlateau(o, "min", factor=0.1, patience=2),
         t, torch.optim.lr_scheduler.ReduceLROnPlateau(t, "min", factor=0.1, patience=2), len(metrics), metrics)


def test_scheduler_state_dict_round_trip():
    o = _our_opt()
    s = optim.lr_scheduler.StepLR(o, 2, 0.1)
    for _ in range(3):
        s.step()
    o2 = _our_opt()
    s2 = optim.lr_scheduler.StepLR(o2, 2, 0.1)
    s2.load_state_dict(s.state_dict())
    s.step()
    s2.step()
    assert o.param_groups[0]["lr"] == pytest.approx(o2.param_groups[0]["lr"])
