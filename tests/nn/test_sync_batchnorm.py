"""Synchronised BatchNorm2d (`allreduce`) against one process holding the whole batch.

N data-parallel processes are emulated in this one process: each rank is a thread holding its
shard of the batch, and the allreduce sums the ranks' arrays at a barrier (in rank order, so
every rank gets the same bits). Only one rank runs at a time: a lock is held while a rank
computes and passed on at each allreduce, because Numba's workqueue threading layer must not be
entered from two threads at once; the barrier alone orders the collective calls.

What DDP does, the tests do: the ranks' outputs and input gradients are concatenated, their
weight/bias gradients summed (the gradient all-reduce), and every rank's running statistics
must be the whole batch's. float64 results agree to rounding; float32 ones within float32
summation order.
"""
import threading

import numpy as np
import pytest

from minialex import nn
from minialex.nn.normalization import convert_sync_batchnorm

C, H, W = 3, 5, 4


class Ranks:
    """n emulated processes: run(fn) calls fn(rank) in n threads; allreduce(rank) is that rank's
    collective sum."""

    def __init__(self, n):
        self.n = n
        self.baton = threading.Lock()                      # held by the one rank computing
        self.barrier = threading.Barrier(n, timeout=60)
        self.inbox = [None] * n
        self.calls = [0] * n

    def allreduce(self, rank):
        def reduce(a):
            self.calls[rank] += 1
            self.inbox[rank] = a.copy()
            self.baton.release()
            try:
                self.barrier.wait()                        # every rank has contributed
                total = self.inbox[0].copy()
                for other in self.inbox[1:]:
                    total += other
                self.barrier.wait()                        # every rank has read the inbox
            finally:
                self.baton.acquire()
            a[...] = total
            return a
        return reduce

    def run(self, fn):
        """[fn(0), ..., fn(n-1)], each run in its own thread; a rank's exception is returned in
        its place (a rank that fails breaks the barrier, so the others cannot hang)."""
        results = [None] * self.n

        def main(rank):
            with self.baton:
                try:
                    results[rank] = fn(rank)
                except Exception as e:                     # noqa: BLE001 - handed to the test
                    results[rank] = e
                    if not isinstance(e, ValueError):
                        self.barrier.abort()

        threads = [threading.Thread(target=main, args=(r,)) for r in range(self.n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in threads), "an emulated rank hung"
        return results


def _data(n, dtype, seed, shape=(C, H, W)):
    rng = np.random.default_rng(seed)
    c = shape[0]
    # an offset per channel: the global mean must be found before the squared deviations
    x = (rng.standard_normal((n,) + shape) * 2 + rng.uniform(-20, 20, (1, c, 1, 1))).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    gamma = rng.uniform(0.5, 1.5, c).astype(dtype)
    beta = rng.standard_normal(c).astype(dtype)
    return x, dy, gamma, beta


def _bn(gamma, beta, dtype, allreduce=None):
    bn = nn.BatchNorm2d(gamma.size, momentum=0.3, allreduce=allreduce).to(dtype)
    bn.weight.data[...], bn.bias.data[...] = gamma, beta
    return bn


def _bounds(sizes):
    edges = np.cumsum([0] + list(sizes))
    return list(zip(edges[:-1], edges[1:]))


def _whole(x, dy, gamma, beta, dtype, steps=2):
    """One process with the whole batch: (ys, dxs, dgamma, dbeta, running_mean, running_var);
    `steps` training steps on the same batch, so the running statistics accumulate."""
    bn = _bn(gamma, beta, dtype)
    ys, dxs = [], []
    for _ in range(steps):
        ys.append(bn(x))
        dxs.append(bn.backward(dy))
    return ys, dxs, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var


def _synced(sizes, x, dy, gamma, beta, dtype, steps=2):
    """The same with the batch split into shards of `sizes` over len(sizes) emulated ranks;
    outputs and input gradients concatenated, weight/bias gradients summed over the ranks."""
    ranks = Ranks(len(sizes))
    bounds = _bounds(sizes)

    def rank_main(r):
        lo, hi = bounds[r]
        bn = _bn(gamma, beta, dtype, ranks.allreduce(r))
        ys, dxs = [], []
        for _ in range(steps):
            ys.append(bn(x[lo:hi]))
            dxs.append(bn.backward(dy[lo:hi]))
        return ys, dxs, bn

    out = ranks.run(rank_main)
    for o in out:
        if isinstance(o, Exception):
            raise o
    ys = [np.concatenate([o[0][s] for o in out]) for s in range(steps)]
    dxs = [np.concatenate([o[1][s] for o in out]) for s in range(steps)]
    bns = [o[2] for o in out]
    for bn in bns[1:]:     # one global batch: every rank holds the same bits
        np.testing.assert_array_equal(bn.running_mean, bns[0].running_mean)
        np.testing.assert_array_equal(bn.running_var, bns[0].running_var)
    assert ranks.calls == [3 * steps] * len(sizes)     # 2 in each forward, 1 in each backward
    dgamma = sum(bn.weight.grad.astype(np.float64) for bn in bns)
    dbeta = sum(bn.bias.grad.astype(np.float64) for bn in bns)
    return ys, dxs, dgamma, dbeta, bns[0].running_mean, bns[0].running_var


def _tol(dtype):
    return dict(rtol=1e-11, atol=1e-11) if dtype == np.float64 else dict(rtol=1e-5, atol=2e-5)


SHARDS = {"2 equal": (4, 4), "2 unequal": (5, 3), "3 with an empty one": (3, 0, 4), "3 unequal": (1, 2, 6)}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("sizes", list(SHARDS.values()), ids=list(SHARDS))
def test_ranks_compute_what_one_process_computes_on_the_whole_batch(sizes, dtype):
    x, dy, gamma, beta = _data(sum(sizes), dtype, seed=sum(sizes) * 7 + len(sizes))
    whole = _whole(x, dy, gamma, beta, dtype)
    synced = _synced(sizes, x, dy, gamma, beta, dtype)
    tol = _tol(dtype)
    for ours, ref in zip(synced[0] + synced[1], whole[0] + whole[1]):
        assert ours.dtype == dtype and ours.shape == ref.shape
        np.testing.assert_allclose(ours, ref, **tol)
    # weight/bias gradients: the ranks' shares, summed, over two accumulated backwards
    np.testing.assert_allclose(synced[2], whole[2], rtol=tol["rtol"], atol=tol["atol"] * 100)
    np.testing.assert_allclose(synced[3], whole[3], rtol=tol["rtol"], atol=tol["atol"] * 100)
    # running statistics, with the unbiased correction M/(M-1) of the global count M
    np.testing.assert_allclose(synced[4], whole[4], **tol)
    np.testing.assert_allclose(synced[5], whole[5], **tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ranks_match_torch_batchnorm_on_the_whole_batch(torch, dtype):
    sizes = (5, 0, 3)
    x, dy, gamma, beta = _data(sum(sizes), dtype, seed=3)
    ys, dxs, dgamma, dbeta, rm, rv = _synced(sizes, x, dy, gamma, beta, dtype, steps=1)
    ref = torch.nn.BatchNorm2d(C, momentum=0.3).to(torch.float64 if dtype == np.float64 else torch.float32)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(gamma))
        ref.bias.copy_(torch.from_numpy(beta))
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    yt = ref(xt)
    yt.backward(torch.from_numpy(dy))
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == np.float64 else dict(rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ys[0], yt.detach().numpy(), **tol)
    np.testing.assert_allclose(dxs[0], xt.grad.numpy(), **tol)
    np.testing.assert_allclose(dgamma, ref.weight.grad.numpy(), **tol)
    np.testing.assert_allclose(dbeta, ref.bias.grad.numpy(), **tol)
    np.testing.assert_allclose(rm, ref.running_mean.numpy(), **tol)
    np.testing.assert_allclose(rv, ref.running_var.numpy(), **tol)


def test_a_nan_on_one_rank_poisons_its_channel_on_every_rank():
    sizes = (4, 3)
    x, dy, gamma, beta = _data(sum(sizes), np.float32, seed=11)
    x[5, 1, 2, 3] = np.nan                          # in rank 1's shard, channel 1
    whole = _whole(x, dy, gamma, beta, np.float32, steps=1)
    synced = _synced(sizes, x, dy, gamma, beta, np.float32, steps=1)
    y, dx = synced[0][0], synced[1][0]
    assert np.isnan(y[:, 1]).all() and np.isnan(dx[:, 1]).all()    # rank 0's rows too
    assert np.isnan(synced[2][1]) and np.isnan(synced[4][1]) and np.isnan(synced[5][1])
    others = [0, 2]
    np.testing.assert_allclose(y[:, others], whole[0][0][:, others], **_tol(np.float32))
    np.testing.assert_allclose(dx[:, others], whole[1][0][:, others], **_tol(np.float32))
    assert np.isfinite(synced[2][others]).all() and np.isfinite(synced[5][others]).all()


def test_the_one_value_rule_applies_to_the_global_count():
    # one value per channel on each of two ranks: 2 in the global batch, which is enough
    x, dy, gamma, beta = _data(2, np.float64, seed=5, shape=(C, 1, 1))
    whole = _whole(x, dy, gamma, beta, np.float64, steps=1)
    synced = _synced((1, 1), x, dy, gamma, beta, np.float64, steps=1)
    np.testing.assert_allclose(synced[0][0], whole[0][0], **_tol(np.float64))
    np.testing.assert_allclose(synced[1][0], whole[1][0], **_tol(np.float64))
    # one value in the whole global batch (the other rank is empty): every rank refuses it
    ranks = Ranks(2)
    shards = [x[:1], x[:0]]
    errors = ranks.run(lambda r: _bn(gamma, beta, np.float64, ranks.allreduce(r))(shards[r]))
    assert all(isinstance(e, ValueError) and "more than 1 value per channel" in str(e) for e in errors)


def test_eval_mode_never_calls_allreduce_and_is_unchanged():
    x, dy, gamma, beta = _data(4, np.float32, seed=8)
    calls = []
    synced = _bn(gamma, beta, np.float32, lambda a: calls.append(a) or a)
    plain = _bn(gamma, beta, np.float32)
    for bn in (synced, plain):
        bn.running_mean[...], bn.running_var[...] = [1, -2, 3], [0.5, 2, 4]
        bn.eval()
    np.testing.assert_array_equal(synced(x), plain(x))
    np.testing.assert_array_equal(synced.backward(dy), plain.backward(dy))
    np.testing.assert_array_equal(synced.weight.grad, plain.weight.grad)
    np.testing.assert_array_equal(synced(x[:0]), plain(x[:0]))     # an empty batch too
    synced.backward(dy[:0])
    assert calls == []


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_rank_with_allreduce_is_bit_identical_to_none(dtype):
    # the synchronised path reduces over one process exactly as the default path computes
    x, dy, gamma, beta = _data(6, dtype, seed=21)
    x[2, 2, 1, 1] = np.nan
    whole = _whole(x, dy, gamma, beta, dtype)
    synced = _synced((6,), x, dy, gamma, beta, dtype)
    for ours, ref in zip(synced[0] + synced[1] + [synced[4], synced[5]], whole[0] + whole[1] + [whole[4], whole[5]]):
        assert ours.tobytes() == ref.tobytes()
    assert synced[2].tobytes() == whole[2].astype(np.float64).tobytes()


def _model():
    return nn.Sequential(nn.Conv2d(C, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 2, 3), nn.BatchNorm2d(2))


def test_convert_sync_batchnorm_makes_a_model_train_like_one_process():
    sizes = (3, 0, 2)
    x, _, _, _ = _data(sum(sizes), np.float64, seed=2)
    whole_model = _model().to(np.float64)
    state = whole_model.state_dict()
    y = whole_model(x)
    dy = np.random.default_rng(4).standard_normal(y.shape)
    whole_model.backward(dy)
    ranks = Ranks(len(sizes))
    bounds = _bounds(sizes)

    def rank_main(r):
        lo, hi = bounds[r]
        model = convert_sync_batchnorm(_model().to(np.float64), ranks.allreduce(r))
        model.load_state_dict(state)
        y_r = model(x[lo:hi])
        model.backward(dy[lo:hi])
        return model, y_r

    out = ranks.run(rank_main)
    assert ranks.calls == [2 * 3] * len(sizes)       # two BatchNorm2d layers, 3 calls each
    np.testing.assert_allclose(np.concatenate([o[1] for o in out]), y, rtol=1e-10, atol=1e-10)
    for name, p in whole_model.named_parameters():   # the gradient all-reduce: a sum over ranks
        summed = sum(dict(o[0].named_parameters())[name].grad for o in out)
        np.testing.assert_allclose(summed, p.grad, rtol=1e-9, atol=1e-9, err_msg=name)
    for name, b in whole_model.named_buffers():
        np.testing.assert_allclose(dict(out[1][0].named_buffers())[name], b, rtol=1e-10, atol=1e-10)
    assert all(m.allreduce is None for m in convert_sync_batchnorm(out[0][0], None).modules()
               if isinstance(m, nn.BatchNorm2d))
