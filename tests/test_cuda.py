"""normzoo on a GPU: layers, functional, the compiled (Triton) kernels, convert, FrozenBatchNorm2d and SyncBatchNorm
on nccl, against the float64 oracle (run on the CPU from the same inputs) and torch.nn on the same device.

Marked `cuda` and skipped without a GPU: `pytest -m cuda` runs only these (scripts/gpu_check.sh does). With
NORMZOO_TEST_DEVICE=cpu they run on the CPU instead (gloo in place of nccl), to check their plumbing on a machine
without a GPU; that proves nothing about CUDA.
"""

from __future__ import annotations

import datetime
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn

import normzoo
from normzoo import cli, compiling
from normzoo import functional as NF
from normzoo.sweeps import equivalence as eq
from normzoo.sweeps import grid
from normzoo.sweeps.oracle import PermuteLayerNorm2d, Reference

DEVICE = os.environ.get("NORMZOO_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                       reason="CUDA is not available (set NORMZOO_TEST_DEVICE=cpu to run these on the CPU)"),
]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LAYOUTS = ["contiguous", "channels_last"]
IN_AFFINE = {"name": "in_affine", "type": "instance_norm", "affine": True}


def _cases(**g):
    return grid.parse({"grids": [g]}, "equivalence", "test_cuda").cases


def _not_failed(rows: list[dict]) -> list[str]:
    """The rows that FAIL, one line each (TORCH-OFF is a finding about torch on this device, not a failure)."""
    return [f"{r['layer']} {r['shape']} {r['dtype']} {r['layout']} off={r['offset']} {r['mode']} "
            f"comp={r['compiled']}: zoo out {r['err_zoo']}, grad {r['grad_err_zoo']}, stats {r['stats_err_zoo']} "
            f"> tol {r['tolerance']:.2e} ({r['note']})" for r in rows if r["verdict"] == eq.FAIL]


# ---------------------------------------------------------------------------------------------------------------
# Every family, eager engine, against the float64 oracle and torch.nn on the device


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_every_family_against_the_oracle(dtype, layout):
    """Output, input and parameter gradients, running statistics (3 BatchNorm steps), inputs of mean 0 and 1e3,
    train and eval: within the equivalence tolerance of the float64 oracle, in float32, bfloat16 and float16."""
    cases = _cases(layers=["gn32", "gn32_silu", IN_AFFINE, "bn", "frozen_bn", "sync_bn", "ln2d"],
                   shapes=[[2, 64, 6, 6]], dtypes=[dtype], layouts=[layout], offsets=[0, 1000],
                   modes=["train", "eval"], compiled=[False])
    if layout == "contiguous":  # the last-dim norms have no channels_last form
        cases += _cases(layers=["ln", "rms"], shapes=[[2, 6, 64]], dtypes=[dtype], offsets=[0, 1000],
                        compiled=[False])
    rows = [eq.run_case(c, device=DEVICE) for c in cases]
    assert len(rows) >= 14
    failed = _not_failed(rows)
    assert not failed, "\n".join(failed)


def _pairs(C: int):
    """(normzoo layer, the torch.nn layer it replaces, input shape) with the same parameters."""
    gn, tgn = normzoo.GroupNorm(8, C, compile=False), nn.GroupNorm(8, C)
    bn, tbn = normzoo.BatchNorm2d(C, compile=False), nn.BatchNorm2d(C)
    inn, tin = normzoo.InstanceNorm2d(C, affine=True, compile=False), nn.InstanceNorm2d(C, affine=True)
    ln2, tln2 = normzoo.LayerNorm2d(C, compile=False), PermuteLayerNorm2d(C, eps=1e-6)
    ln, tln = normzoo.LayerNorm(C, compile=False), nn.LayerNorm(C)
    rms, trms = normzoo.RMSNorm(C, compile=False), nn.RMSNorm(C)
    return [(gn, tgn, (2, C, 5, 7)), (bn, tbn, (3, C, 5, 7)), (inn, tin, (2, C, 5, 7)), (ln2, tln2, (2, C, 5, 7)),
            (ln, tln, (2, 9, C)), (rms, trms, (2, 9, C))]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_layers_follow_device_dtype_and_layout(dtype, layout):
    """Built with device=/dtype= (factory_kwargs) or moved with .to(): parameters, buffers, outputs and every
    gradient on the device, in the dtype, the input gradient in the input's memory format; values agree with
    torch.nn on the same device (within twice the tolerance: both round) and buffers are updated there."""
    dt = DTYPES[dtype]
    tol = 2 * grid.default_tolerance(dtype)
    torch.manual_seed(0)
    for zoo, theirs, shape in _pairs(16):
        if layout == "channels_last" and len(shape) != 4:
            continue
        zoo, theirs = zoo.to(DEVICE, dt), theirs.to(DEVICE, dt)
        with torch.no_grad():
            for p in zoo.parameters():
                p.uniform_(0.5, 1.5)
        theirs.load_state_dict(zoo.state_dict())
        fmt = grid.memory_format(layout, len(shape))
        x = torch.randn(shape, device=DEVICE).to(dt).contiguous(memory_format=fmt)
        dy = torch.randn(shape, device=DEVICE).to(dt).contiguous(memory_format=fmt)  # as a network's would be
        out = {}
        for name, m in (("zoo", zoo), ("torch", theirs)):
            xr = x.clone().requires_grad_(True)
            y = m(xr)
            grads = torch.autograd.grad(y, [xr] + list(m.parameters()), dy)
            out[name] = (y, grads)
        (y, grads), (ty, tgrads) = out["zoo"], out["torch"]
        what = f"{type(zoo).__name__} {dtype} {layout}"
        assert y.device.type == DEVICE and y.dtype == dt and y.shape == x.shape, what
        assert grads[0].is_contiguous(memory_format=fmt), f"{what}: input gradient not in the input's layout"
        for t in list(grads) + list(zoo.parameters()) + list(zoo.buffers()):
            assert t.device.type == DEVICE, f"{what}: a tensor left the device"
        for a, b, name in zip((y,) + tuple(grads), (ty,) + tuple(tgrads), ("y", "dx", "dweight", "dbias")):
            assert eq.rel_err(a, b) <= tol, f"{what} {name}: {eq.rel_err(a, b):.2e} from torch.nn > {tol:.2e}"
        if isinstance(zoo, normzoo.BatchNorm2d):
            assert int(zoo.num_batches_tracked) == 1
            for buf in ("running_mean", "running_var"):
                assert eq.rel_err(getattr(zoo, buf), getattr(theirs, buf)) <= tol, f"{what} {buf}"


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_functional_on_the_device(dtype):
    """normzoo.functional against torch.nn.functional, tensors built on the device (no CPU default anywhere)."""
    dt = DTYPES[dtype]
    tol = 2 * grid.default_tolerance(dtype)
    torch.manual_seed(1)
    x = torch.randn(3, 16, 4, 5, device=DEVICE, dtype=dt)
    w, b = (torch.rand(16, device=DEVICE, dtype=dt) + 0.5), torch.randn(16, device=DEVICE, dtype=dt)
    rm, rv = torch.randn(16, device=DEVICE, dtype=dt), torch.rand(16, device=DEVICE, dtype=dt) + 0.5
    seq = torch.randn(2, 7, 16, device=DEVICE, dtype=dt)
    checks = {
        "group_norm": (NF.group_norm(x, 4, w, b, compile=False), F.group_norm(x, 4, w, b)),
        "instance_norm": (NF.instance_norm(x, weight=w, bias=b, compile=False), F.instance_norm(x, weight=w, bias=b)),
        "batch_norm eval": (NF.batch_norm(x, rm, rv, w, b, compile=False), F.batch_norm(x, rm, rv, w, b)),
        "layer_norm": (NF.layer_norm(seq, (16,), w, b, compile=False), F.layer_norm(seq, (16,), w, b)),
        "rms_norm": (NF.rms_norm(seq, (16,), w, compile=False), F.rms_norm(seq, (16,), w)),
        "layer_norm2d": (NF.layer_norm2d(x, w, b, compile=False),
                         F.layer_norm(x.permute(0, 2, 3, 1), (16,), w, b, 1e-6).permute(0, 3, 1, 2)),
        "group_norm + silu": (NF.group_norm(x, 4, w, b, activation="silu", compile=False),
                              F.silu(F.group_norm(x, 4, w, b))),
    }
    rm2, rv2, trm, trv = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    checks["batch_norm train"] = (NF.batch_norm(x, rm2, rv2, w, b, True, 0.1, compile=False),
                                  F.batch_norm(x, trm, trv, w, b, True, 0.1))
    checks["running_mean"], checks["running_var"] = (rm2, trm), (rv2, trv)
    for name, (got, want) in checks.items():
        assert got.device.type == DEVICE and got.dtype == dt, name
        assert eq.rel_err(got, want) <= tol, f"{name} {dtype}: {eq.rel_err(got, want):.2e} from torch > {tol:.2e}"


# ---------------------------------------------------------------------------------------------------------------
# The compiled kernels (Triton on CUDA)


def test_compiled_kernels_against_the_oracle():
    """normzoo's default path, Inductor-compiled for the device, in the dtypes and layouts users train with: within
    the oracle's tolerance, with compilation on (no silent eager fallback) and one kernel per signature."""
    before = compiling.cache_info()
    cases = (_cases(layers=["gn32"], shapes=[[2, 64, 16, 16]], dtypes=["float32", "bfloat16"],
                    layouts=["channels_last"], offsets=[0, 1000], compiled=[True])
             + _cases(layers=["gn32_silu"], shapes=[[2, 64, 16, 16]], dtypes=["float16"], offsets=[0, 1000],
                      compiled=[True])
             + _cases(layers=["ln"], shapes=[[4, 49, 96]], dtypes=["bfloat16"], offsets=[0, 1000], compiled=[True]))
    rows = [eq.run_case(c, device=DEVICE) for c in cases]
    failed = _not_failed(rows)
    assert not failed, "\n".join(failed)
    after = compiling.cache_info()
    assert after["compile_disabled_reason"] is None, after
    # 4 signatures (the offsets share one); fewer only where an earlier test compiled the same one
    assert 1 <= after["compiles"] - before["compiles"] <= 4, (before, after)


def test_kernel_cache_keys_on_the_device():
    """The same layer on the device twice: one compile, then the cached kernel; its key holds the device, so a
    CPU call of the same signature could never be handed this kernel."""
    x = torch.randn(2, 32, 8, 8, device=DEVICE)
    m = normzoo.GroupNorm(8, 32).to(DEVICE)
    before = compiling.cache_info()["compiles"]
    with torch.no_grad():
        y1, y2 = m(x), m(x)
    assert compiling.cache_info()["compiles"] - before <= 1
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    assert any(isinstance(part, tuple) and x.device in part for key in compiling._state.kernels for part in key)
    ref = normzoo.GroupNorm(8, 32, compile=False).to(DEVICE)
    with torch.no_grad():
        assert eq.rel_err(y1, ref(x)) <= 2 * grid.default_tolerance("float32")


# ---------------------------------------------------------------------------------------------------------------
# convert and FrozenBatchNorm2d keep the model's device (and dtype)


class _BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d pattern (norm, then drop, then act): convert probes its forward in float64 on the
    model's device before it fuses the activation."""

    def __init__(self, c):
        super().__init__(c)
        self.drop, self.act = nn.Identity(), nn.ReLU()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


def _bn_cnn(C=32):
    return nn.Sequential(nn.Conv2d(3, C, 3, padding=1), nn.BatchNorm2d(C), nn.ReLU(), nn.Conv2d(C, C, 1),
                         _BatchNormAct2d(C))


def _gn_cnn(C=32):
    return nn.Sequential(nn.Conv2d(3, C, 3, padding=1), nn.GroupNorm(8, C), nn.SiLU(), nn.Conv2d(C, C, 1),
                         nn.GroupNorm(8, C))


def _ln_mlp(C=32):
    return nn.Sequential(nn.Flatten(2), nn.Linear(36, C), nn.LayerNorm(C), nn.GELU(), nn.Linear(C, C), nn.LayerNorm(C))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("build,spec,same", [(_bn_cnn, "bn", True), (_bn_cnn, "frozen_bn", True),
                                             (_gn_cnn, "gn8", True), (_ln_mlp, "ln", True),
                                             (_bn_cnn, "gn32", False)])
def test_convert_keeps_device_and_dtype(build, spec, same, dtype):
    """Every converted layer lands on the model's device in its dtype (the timm-like BatchNormAct2d is probed in
    float64 there first); a same-family conversion of an eval model computes what it computed before."""
    dt = DTYPES[dtype]
    torch.manual_seed(2)
    model = build().to(DEVICE, dt).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 6, 6, device=DEVICE, dtype=dt)
    with torch.no_grad():
        before = model(x)
    normzoo.convert(model, spec, compile=False)
    new = [m for m in model.modules() if type(m).__module__.startswith("normzoo")]
    assert len(new) >= 2, model
    for t in list(model.parameters()) + list(model.buffers()):
        assert t.device.type == DEVICE, f"{spec}: a tensor of the converted model is on {t.device}"
        assert not t.is_floating_point() or t.dtype == dt, f"{spec}: {t.dtype} in a {dtype} model"
    with torch.no_grad():
        after = model(x)
    assert after.device.type == DEVICE and after.dtype == dt
    if same:  # two norms with a layer between: each within twice the tolerance of torch's
        tol = 4 * grid.default_tolerance(dtype)
        assert eq.rel_err(after, before) <= tol, f"{spec}: {eq.rel_err(after, before):.2e} > {tol:.2e}"


def test_frozen_batchnorm_on_the_device():
    frozen = normzoo.FrozenBatchNorm2d(8, device=DEVICE, compile=False)
    bn = nn.BatchNorm2d(8).to(DEVICE).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
    frozen.load_state_dict(bn.state_dict())
    assert all(t.device.type == DEVICE for t in frozen.buffers())
    x = torch.randn(2, 8, 5, 5, device=DEVICE).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = frozen.train()(x)
        assert eq.rel_err(y, bn(x)) <= 2 * grid.default_tolerance("float32")
    assert y.is_contiguous(memory_format=torch.channels_last)
    frozen_model = normzoo.FrozenBatchNorm2d.convert_frozen_batchnorm(_bn_cnn().to(DEVICE))
    assert all(t.device.type == DEVICE for t in frozen_model.buffers())


# ---------------------------------------------------------------------------------------------------------------
# SyncBatchNorm on nccl (gloo for NORMZOO_TEST_DEVICE=cpu), world size 1


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    """A world of one rank in this process (a FileStore, no network), torn down after this module."""
    backend = "nccl" if DEVICE == "cuda" else "gloo"
    if not dist.is_available() or (backend == "nccl" and not dist.is_nccl_available()):
        pytest.skip(f"torch.distributed with {backend} is not available in this build")
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    store = dist.FileStore(str(tmp_path_factory.mktemp("pg") / "store"), 1)
    dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=60))
    yield backend
    dist.destroy_process_group()


def _oracle_bn(C, weight, bias, x, dy, momentum):
    """The float64 oracle of one BatchNorm training step (output, gradients, running statistics)."""
    bn = normzoo.BatchNorm2d(C, momentum=momentum, compile=False)
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    return eq._oracle(Reference(bn, x.dtype), [], x, dy, True)


@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_sync_batchnorm_collectives_world_of_one(process_group, offset):
    """The synchronized path itself (all-gather of the moments, all-reduce of the gradient sums) run through the
    backend with one rank: output, input and parameter gradients and running statistics equal one BatchNorm's,
    against the float64 oracle. (The layer takes its BatchNorm path at world size 1, so this calls the step.)"""
    from normzoo import sync

    torch.manual_seed(3)
    C = 6
    x = (torch.randn(5, C, 4, 3) * 2 + offset).to(DEVICE)
    dy = torch.randn(5, C, 4, 3).to(DEVICE)
    weight = (torch.rand(C) + 0.5).to(DEVICE).requires_grad_(True)
    bias = torch.randn(C).to(DEVICE).requires_grad_(True)
    rm, rv = torch.zeros(C, device=DEVICE), torch.ones(C, device=DEVICE)
    xr = x.clone().requires_grad_(True)
    y = sync._sync_batch_norm_eager(xr, weight, bias, rm, rv, 0.1, 1e-5, None, 1, None)
    got = dict(zip(("dx", "dweight", "dbias"), torch.autograd.grad(y, [xr, weight, bias], dy)))
    got.update(y=y, running_mean=rm, running_var=rv)
    want = _oracle_bn(C, weight.detach().cpu(), bias.detach().cpu(), x.cpu(), dy.cpu(), 0.1)
    tol = eq.tolerance(grid.default_tolerance("float32"), x.cpu())
    for k, v in want.items():
        assert got[k].device.type == DEVICE, k
        assert eq.rel_err(got[k], v) <= tol, f"{process_group} {k}: {eq.rel_err(got[k], v):.2e} > {tol:.2e}"


def test_sync_batchnorm_layer_world_of_one(process_group):
    """The layer under an initialized group of one rank is BatchNorm: outputs, gradients, running statistics and
    num_batches_tracked agree with torch.nn.BatchNorm2d over 3 steps; eval uses the running statistics."""
    torch.manual_seed(4)
    sync_bn = normzoo.SyncBatchNorm(8, compile=False).to(DEVICE)
    ref = nn.BatchNorm2d(8).to(DEVICE)
    assert dist.get_world_size() == 1 and dist.get_backend() == process_group
    tol = 2 * grid.default_tolerance("float32")
    for _ in range(3):
        x = torch.randn(4, 8, 5, 5, device=DEVICE) * 3 + 1
        dy = torch.randn(4, 8, 5, 5, device=DEVICE)
        outs = []
        for m in (sync_bn, ref):
            xr = x.clone().requires_grad_(True)
            y = m(xr)
            y.backward(dy)
            outs.append((y.detach(), xr.grad, m.weight.grad, m.bias.grad))
            m.zero_grad()
        for a, b in zip(*outs):
            assert eq.rel_err(a, b) <= tol
    assert int(sync_bn.num_batches_tracked) == 3
    for buf in ("running_mean", "running_var"):
        assert eq.rel_err(getattr(sync_bn, buf), getattr(ref, buf)) <= tol
    x = torch.randn(2, 8, 5, 5, device=DEVICE)
    with torch.no_grad():
        assert eq.rel_err(sync_bn.eval()(x), ref.eval()(x)) <= tol
    converted = normzoo.SyncBatchNorm.convert_sync_batchnorm(
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).to(DEVICE))
    assert all(t.device.type == DEVICE for t in list(converted.parameters()) + list(converted.buffers()))


# ---------------------------------------------------------------------------------------------------------------
# The sweeps' CLI on the device


def test_cli_equivalence_and_speed_on_the_device(tmp_path, capsys):
    """`normzoo equivalence --device` and `normzoo speed --device` run a tiny sweep there: exit 0, the report
    names the device (the GPU's name on CUDA), speed's times are measured (synchronized by torch.utils.benchmark)."""
    sweep = tmp_path / "eq.yaml"
    sweep.write_text(yaml.safe_dump({"grids": [{"layers": ["gn8", "bn"], "shapes": [[2, 16, 4, 4]],
                                                "dtypes": ["float32", "float16"], "offsets": [0, 1000],
                                                "compiled": [False]}]}))
    out = tmp_path / "eq.json"
    assert cli.main(["equivalence", str(sweep), "--device", DEVICE, "--format", "json", "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["summary"]["cases"] == 8 and data["summary"]["fail"] == 0
    device = data["environment"]["device"]
    assert device == "cpu" if DEVICE == "cpu" else device.startswith("cuda (") and len(device) > len("cuda ()")

    sweep = tmp_path / "speed.yaml"
    sweep.write_text(yaml.safe_dump({"blocks": 1, "threads": 1, "grids": [
        {"layers": ["ln"], "shapes": [[4, 49, 96]], "passes": ["forward"]}]}))
    out = tmp_path / "speed.json"
    assert cli.main(["speed", str(sweep), "--device", DEVICE, "--format", "json", "--output", str(out)]) == 0
    case = json.loads(out.read_text())["cases"][0]
    assert case["device"] == DEVICE
    assert all(case["times_ms"][k] and case["times_ms"][k] > 0 for k in ("torch", "torch_compiled", "normzoo", "copy"))
    capsys.readouterr()
