"""normzoo.SyncBatchNorm: 2 processes on 127.0.0.1 with gloo equal one BatchNorm on the whole batch."""

from __future__ import annotations

import datetime
import json
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import normzoo

TIMEOUT = datetime.timedelta(seconds=60)  # a collective that hangs fails the test instead of the suite


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world_size: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", "/tmp/ind_shared")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=TIMEOUT)


def _spawn(fn, world_size: int, *args) -> None:
    port = _free_port()
    mp.spawn(fn, args=(world_size, port) + args, nprocs=world_size, join=True)


# (rank 0 rows, rank 1 rows) per step: unequal, and one rank empty
SPLITS = [(3, 5), (0, 6), (4, 1), (2, 2)]


def _check_vs_whole_batch(rank, world_size, port, momentum, dtype, shape_tail, mean_offset):
    C = shape_tail[0]
    torch.manual_seed(0)  # same parameters, data and upstream gradients on every rank
    weight0 = torch.randn(C, dtype=dtype)
    bias0 = torch.randn(C, dtype=dtype)
    sync = normzoo.SyncBatchNorm(C, momentum=momentum, dtype=dtype)
    ref = normzoo.BatchNorm2d(C, momentum=momentum, dtype=dtype, compile=False) if len(shape_tail) == 3 \
        else normzoo.BatchNorm1d(C, momentum=momentum, dtype=dtype, compile=False)
    ref_torch = (nn.BatchNorm2d if len(shape_tail) == 3 else nn.BatchNorm1d)(C, momentum=momentum, dtype=dtype)
    for m in (sync, ref, ref_torch):
        with torch.no_grad():
            m.weight.copy_(weight0)
            m.bias.copy_(bias0)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    tol_torch = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    lr = 0.1
    for step, split in enumerate(SPLITS):
        n = sum(split)
        x = torch.randn(n, *shape_tail, dtype=dtype) * 3 + mean_offset
        g = torch.randn(n, *shape_tail, dtype=dtype)
        lo = sum(split[:rank])
        mine = slice(lo, lo + split[rank])

        x_local = x[mine].clone().requires_grad_(True)
        y_local = sync(x_local)
        (y_local * g[mine]).sum().backward()

        outs = {}
        for name, m in (("normzoo", ref), ("torch", ref_torch)):
            xr = x.clone().requires_grad_(True)
            yr = m(xr)
            (yr * g).sum().backward()
            outs[name] = (yr.detach(), xr.grad)

        # parameter grads: each rank holds its own share; their sum is the whole batch's gradient
        grads = [sync.weight.grad.clone(), sync.bias.grad.clone()]
        for t in grads:
            dist.all_reduce(t)
        for name, t in (("normzoo", tol), ("torch", tol_torch)):
            yr, gx = outs[name]
            m = ref if name == "normzoo" else ref_torch
            where = f"rank {rank} step {step} split {split} vs {name}"
            torch.testing.assert_close(y_local.detach(), yr[mine], **t, msg=lambda s: f"{where} output: {s}")
            torch.testing.assert_close(x_local.grad, gx[mine], **t, msg=lambda s: f"{where} input grad: {s}")
            torch.testing.assert_close(grads[0], m.weight.grad, **t, msg=lambda s: f"{where} weight grad: {s}")
            torch.testing.assert_close(grads[1], m.bias.grad, **t, msg=lambda s: f"{where} bias grad: {s}")
            torch.testing.assert_close(sync.running_mean, m.running_mean, **t,
                                       msg=lambda s: f"{where} running_mean: {s}")
            torch.testing.assert_close(sync.running_var, m.running_var, **t,
                                       msg=lambda s: f"{where} running_var: {s}")
            assert int(sync.num_batches_tracked) == int(m.num_batches_tracked) == step + 1
        # one SGD step on all three with the (all-reduced) gradients, so later steps see new parameters
        with torch.no_grad():
            for m, (gw, gb) in ((sync, grads), (ref, (ref.weight.grad, ref.bias.grad)),
                                (ref_torch, (ref_torch.weight.grad, ref_torch.bias.grad))):
                m.weight -= lr * gw
                m.bias -= lr * gb
                m.weight.grad = m.bias.grad = None

    # eval: the running statistics, no communication, same as BatchNorm
    sync.eval()
    ref.eval()
    x = torch.randn(3, *shape_tail, dtype=dtype) + mean_offset
    torch.testing.assert_close(sync(x), ref(x), **tol)


def _check_compiled(rank, world_size, port):
    torch.manual_seed(0)
    C = 4
    model = nn.Sequential(nn.Conv2d(3, C, 3, padding=1), nn.BatchNorm2d(C), nn.ReLU())
    sync_model = normzoo.SyncBatchNorm.convert_sync_batchnorm(
        nn.Sequential(nn.Conv2d(3, C, 3, padding=1), nn.BatchNorm2d(C), nn.ReLU()))
    sync_model.load_state_dict(model.state_dict())
    assert isinstance(sync_model[1], normzoo.SyncBatchNorm)
    compiled = torch.compile(sync_model)
    split = (2, 3)
    x = torch.randn(sum(split), 3, 5, 5)
    lo = sum(split[:rank])
    mine = slice(lo, lo + split[rank])
    for _ in range(2):
        xl = x[mine].clone().requires_grad_(True)
        y = compiled(xl)
        y.sum().backward()
        xr = x.clone().requires_grad_(True)
        yr = model(xr)
        yr.sum().backward()
        torch.testing.assert_close(y, yr[mine], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(xl.grad, xr.grad[mine], rtol=1e-4, atol=1e-4)
    gw = sync_model[0].weight.grad.clone()
    dist.all_reduce(gw)
    torch.testing.assert_close(gw, model[0].weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sync_model[1].running_var, model[1].running_var, rtol=1e-5, atol=1e-5)


def _check_group_of_one(rank, world_size, port):
    # a process group holding only this rank: world size 1, so exactly BatchNorm, no communication
    group, _ = dist.new_subgroups(group_size=1)
    torch.manual_seed(1)
    sync = normzoo.SyncBatchNorm(3, process_group=group, compile=False)
    ref = normzoo.BatchNorm2d(3, compile=False)
    x = torch.randn(4 + rank, 3, 2, 2)
    torch.testing.assert_close(sync(x), ref(x), rtol=0, atol=0)
    torch.testing.assert_close(sync.running_var, ref.running_var, rtol=0, atol=0)


def _check_too_few_values(rank, world_size, port):
    sync = normzoo.SyncBatchNorm(2)
    x = torch.randn(1 if rank == 0 else 0, 2)  # one value per channel over both ranks
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        sync(x)


CHECKS = {
    "2d-f32": lambda r, w, p: _check_vs_whole_batch(r, w, p, 0.1, torch.float32, (3, 4, 5), 0.0),
    # 1d (N, C, L), cumulative average, float64: an exact comparison
    "1d-f64-cumulative": lambda r, w, p: _check_vs_whole_batch(r, w, p, None, torch.float64, (4, 7), 0.0),
    # a large mean: the cross-rank combination must not cancel
    "2d-f32-mean1e3": lambda r, w, p: _check_vs_whole_batch(r, w, p, 0.3, torch.float32, (2, 3, 3), 1e3),
    "too-few-values": _check_too_few_values,
    "group-of-one": _check_group_of_one,
    "torch-compile": _check_compiled,
}


def _worker(rank, world_size, port, out_dir):
    _init(rank, world_size, port)
    results = {}
    try:
        for name, check in CHECKS.items():
            try:
                check(rank, world_size, port)
                results[name] = "ok"
            except Exception:  # noqa: BLE001 - reported per check by the tests below
                results[name] = traceback.format_exc()
                break  # the other rank may be stuck in a collective: later checks would pair up wrongly
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    """Run every check once in one 2-process gloo group (spawning costs ~10 s of imports per process)."""
    out_dir = str(tmp_path_factory.mktemp("sync"))
    error = None
    try:
        _spawn(_worker, 2, out_dir)
    except Exception as err:  # noqa: BLE001 - a crashed or timed-out rank: the checks it did not finish fail
        error = f"{type(err).__name__}: {err}"
    results = []
    for rank in range(2):
        path = os.path.join(out_dir, f"rank{rank}.json")
        results.append(json.load(open(path)) if os.path.exists(path) else {})
    return results, error


@pytest.mark.parametrize("check", list(CHECKS))
def test_two_ranks(check, two_rank_results):
    """2d/1d, float32/float64, EMA/cumulative, mean 1e3: two ranks holding (3, 5), (0, 6), (4, 1), (2, 2) rows of
    the batch equal one normzoo.BatchNorm and one torch.nn.BatchNorm on the whole batch (outputs, input grads,
    all-reduced parameter grads, running statistics, 4 steps with SGD between); one value per channel over
    both ranks raises on both; a group of one rank is BatchNorm; torch.compile of a converted model is right."""
    results, error = two_rank_results
    for rank in range(2):
        got = results[rank].get(check, f"did not run (spawn: {error})")
        assert got == "ok", f"rank {rank}, check {check}:\n{got}"


def test_without_process_group_is_batchnorm():
    torch.manual_seed(2)
    sync = normzoo.SyncBatchNorm(5, momentum=None, compile=False)
    ref = normzoo.BatchNorm1d(5, momentum=None, compile=False)
    for _ in range(3):
        x = torch.randn(6, 5, 3)
        torch.testing.assert_close(sync(x), ref(x), rtol=0, atol=0)
    torch.testing.assert_close(sync.running_mean, ref.running_mean, rtol=0, atol=0)
    sync.eval(), ref.eval()
    x = torch.randn(2, 5, 3)
    torch.testing.assert_close(sync(x), ref(x), rtol=0, atol=0)


def test_signature_and_state_dict_match_torch():
    ours, theirs = normzoo.SyncBatchNorm(6), nn.SyncBatchNorm(6)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    pg = object()
    m = normzoo.SyncBatchNorm(6, 1e-3, 0.2, False, False, pg)  # torch's positional order
    assert (m.eps, m.momentum, m.affine, m.track_running_stats, m.process_group) == (1e-3, 0.2, False, False, pg)
    assert m.weight is None and m.running_mean is None


def test_convert_sync_batchnorm_keeps_parameters_buffers_and_mode():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4),
                          nn.Sequential(normzoo.BatchNorm1d(4, compile=False), nn.BatchNorm3d(4, affine=False)))
    with torch.no_grad():
        model[1].running_mean.fill_(0.5)
        model[1].weight.fill_(2.0)
    model[1].num_batches_tracked.fill_(7)
    model[2][0].eval()
    weight = model[1].weight
    pg = object()
    out = normzoo.SyncBatchNorm.convert_sync_batchnorm(model, process_group=pg)
    assert out is model
    bns = [model[1], model[2][0], model[2][1]]
    assert all(isinstance(m, normzoo.SyncBatchNorm) and m.process_group is pg for m in bns)
    assert model[1].weight is weight  # the same Parameter: an optimizer built before keeps working
    assert float(model[1].running_mean[0]) == 0.5 and int(model[1].num_batches_tracked) == 7
    assert model[2][0].compile is False and not model[2][0].training and model[2][1].training
    assert model[2][1].weight is None
    single = normzoo.SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm2d(3))
    assert isinstance(single, normzoo.SyncBatchNorm)


def test_computes_through_the_engine_not_torch_batch_norm(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch's batch_norm was called")

    monkeypatch.setattr(torch.nn.functional, "batch_norm", refuse)
    monkeypatch.setattr(torch, "batch_norm", refuse)
    sync = normzoo.SyncBatchNorm(3, compile=False)
    sync(torch.randn(4, 3, 2))
    sync.eval()
    sync(torch.randn(4, 3, 2))
