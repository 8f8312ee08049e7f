"""The kernel store and its policy: kernels built once, loaded by later processes without compiling, validated,
safe under concurrent builders, a warning (and in-memory kernels) when the directory is unusable, the background
build that takes over from the eager engine, and sizes 0 and 1.

Building a kernel takes AOTInductor 10-30 s here, so the tests share one built store (two kernels of a small
GroupNorm) and build as few others as they can."""

import json
import os
import shutil
import subprocess
import sys
import time
import warnings

import pytest
import torch
from torch import nn

import normzoo
from normzoo import builder, compiling, policy, store
from normzoo.precompile import jobs_for, precompile

SHAPE = (3, 4, 5, 6)  # GroupNorm(2, 4) on it: a forward and a backward kernel


def _layer():
    torch.manual_seed(3)
    m = normzoo.GroupNorm(2, 4)
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
    return m


@pytest.fixture(scope="module")
def built_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("kernels")
    saved = os.environ.get("NORMZOO_KERNEL_DIR")
    os.environ["NORMZOO_KERNEL_DIR"] = str(root)
    try:
        summary = precompile(_layer(), torch.randn(SHAPE, requires_grad=True), progress=False)
    finally:
        os.environ["NORMZOO_KERNEL_DIR"] = saved
    assert summary["built"] == 2 and not summary["failed"], summary
    return root


@pytest.fixture
def store_at(tmp_path, monkeypatch):
    def use(source=None):
        root = tmp_path / "store"
        if source is not None:
            shutil.copytree(source, root)
        monkeypatch.setenv("NORMZOO_KERNEL_DIR", str(root))
        monkeypatch.setenv("NORMZOO_COMPILE", "1")
        policy.clear()
        return root
    yield use
    policy.clear()


_CHILD = """
import json, sys, time, torch, normzoo
from torch import nn
from normzoo import compiling, policy
torch.set_num_threads(1)  # the store was built by a process with the suite's thread count
torch.manual_seed(3)
m = normzoo.GroupNorm(2, 4)
with torch.no_grad():
    m.weight.normal_(); m.bias.normal_()
ref = nn.GroupNorm(2, 4).double()
ref.load_state_dict(m.state_dict())
err = 0.0
start = time.perf_counter()
for n in (3, 2, 7):
    x = torch.randn(n, 4, 5, 6, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    g = torch.randn(n, 4, 5, 6)
    m(x).backward(g); ref(x64).backward(g.double())
    err = max(err, (x.grad.double() - x64.grad).abs().max().item())
    with torch.no_grad():
        err = max(err, (m(x).double() - ref(x64)).abs().max().item())
print(json.dumps({"policy": policy.info(), "compiles": compiling.cache_info()["compiles"], "err": err,
                  "seconds": time.perf_counter() - start,
                  "inductor_imported": "torch._inductor.compile_fx" in sys.modules}))
"""


def _child(code, env_updates, *args):
    env = dict(os.environ, **env_updates)
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_fresh_process_loads_the_kernels_without_compiling(built_store, tmp_path):
    """Another process, with another thread count, loads both kernels: no compile, no Inductor import, no eager
    interim, and the gradients agree with the float64 oracle at batch sizes it was not built with."""
    root = tmp_path / "copy"
    shutil.copytree(built_store, root)
    out = _child(_CHILD, {"NORMZOO_KERNEL_DIR": str(root), "NORMZOO_COMPILE": "1"})
    assert out["policy"]["store_loaded"] == 2, out
    assert out["policy"]["store_requested"] == 0 and out["policy"]["eager_interim_calls"] == 0, out
    assert out["compiles"] == 0 and not out["inductor_imported"], out
    assert out["err"] < 1e-5, out


def test_corrupted_truncated_or_foreign_entries_are_detected_and_rebuilt(built_store, store_at):
    root = store_at(built_store)
    x = torch.randn(SHAPE, requires_grad=True)
    jobs = jobs_for(_layer(), x)
    forward, backward = jobs
    package, _ = store.paths(forward["key"], root)
    package.write_bytes(package.read_bytes()[: package.stat().st_size // 2])  # truncated
    foreign = dict(backward["fields"], torch="0.0.0")  # a manifest naming another build environment
    manifest = store.paths(backward["key"], root)[1]
    meta = json.loads(manifest.read_text())
    manifest.write_text(json.dumps(dict(meta, fields=foreign)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert store.load(forward["key"], forward["fields"]) is None
        assert store.load(backward["key"], backward["fields"]) is None
    assert not any(p.exists() for p in store.paths(forward["key"], root))  # removed: a miss from now on
    assert sum("rebuilt" in str(w.message) for w in caught) == 2
    assert builder.build_once(forward) == "built"
    loaded = store.load(forward["key"], forward["fields"])
    y = loaded([x.detach(), _layer().weight.detach(), _layer().bias.detach()])[0]
    torch.testing.assert_close(y, nn.functional.group_norm(x.detach(), 2, _layer().weight, _layer().bias))


_RACER = """
import json, sys, torch, normzoo
from normzoo.precompile import precompile
print(json.dumps(precompile(normzoo.LayerNorm(12), torch.randn(2, 3, 12), grad=False, progress=False)))
"""


def test_two_processes_building_the_same_kernel(tmp_path):
    """Two processes precompile the same kernel into one empty store at once: both succeed, one entry, valid."""
    root = tmp_path / "race"
    env = dict(os.environ, NORMZOO_KERNEL_DIR=str(root))
    procs = [subprocess.Popen([sys.executable, "-c", _RACER], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    results = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert all(not r["failed"] for r in results), results
    assert sum(r["built"] for r in results) >= 1  # the other waited on the lock, found it stored, or built too
    entries = [p for p in root.iterdir() if p.suffix in (".pt2", ".json")]
    assert len(entries) == 2 and not list(root.glob("*.lock")) and not list(root.glob(".*tmp"))
    m = normzoo.LayerNorm(12)
    job = jobs_for(m, torch.randn(2, 3, 12), grad=False)[0]
    x = torch.randn(5, 7, 12)
    loaded = store.load(job["key"], job["fields"], root)
    torch.testing.assert_close(loaded([x, m.weight.detach(), m.bias.detach()])[0], nn.functional.layer_norm(x, (12,)))


def test_an_unusable_directory_warns_once_and_compiles_in_memory(tmp_path, store_at, monkeypatch):
    store_at()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("NORMZOO_KERNEL_DIR", str(blocker / "kernels"))  # under a file: cannot be created
    monkeypatch.setattr(store, "_warned", set())
    _falls_back_to_memory(normzoo.GroupNorm(3, 6), ((2, 6, 3, 9), (2, 6, 4, 9)), "not usable")


def _falls_back_to_memory(m, shapes, warning):
    """Each shape computed right by an in-memory compiled kernel, with one warning containing `warning`."""
    before = compiling.cache_info()["compiles"], policy.info()["store_fallbacks"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for shape in shapes:
            x = torch.randn(shape)
            with torch.no_grad():
                torch.testing.assert_close(m(x), nn.functional.group_norm(x, m.num_groups, m.weight, m.bias))
    assert sum(warning in str(w.message) for w in caught) == 1
    assert compiling.cache_info()["compiles"] - before[0] == len(shapes)  # in memory instead
    assert policy.info()["store_fallbacks"] - before[1] == len(shapes)


def test_background_build_takes_over_from_the_eager_engine(store_at):
    """With an empty store, first calls run the eager engine while the builder process builds the kernel; then
    calls switch to it. Every call is right."""
    store_at()
    m = normzoo.LayerNorm(10)
    before = policy.info()
    deadline = time.monotonic() + 300
    calls = 0
    while policy.info()["store_loaded"] == before["store_loaded"]:
        assert time.monotonic() < deadline, policy.info()
        x = torch.randn(2 + calls % 3, 5, 10)
        with torch.no_grad():
            torch.testing.assert_close(m(x), nn.functional.layer_norm(x, (10,), m.weight, m.bias))
        calls += 1
        time.sleep(0.2)
    info = policy.info()
    assert info["eager_interim_calls"] > before["eager_interim_calls"] and info["store_requested"] == 1 + before[
        "store_requested"]
    x = torch.randn(9, 3, 10)
    with torch.no_grad():
        torch.testing.assert_close(m(x), nn.functional.layer_norm(x, (10,), m.weight, m.bias))
    assert policy.info()["eager_interim_calls"] == info["eager_interim_calls"]  # served by the store kernel


def test_sizes_0_and_1(built_store, store_at):
    """Batch 1 is a kernel of its own (the dim is static in its contract); an empty batch needs none."""
    store_at(built_store)
    m = _layer()
    with policy.recording() as jobs:
        for n in (1, 0):
            x = torch.randn(n, *SHAPE[1:], requires_grad=True)
            y = m(x)
            torch.testing.assert_close(y, nn.functional.group_norm(x, 2, m.weight, m.bias))
            y.sum().backward()
    assert len(jobs) == 2  # batch 1's forward and backward; nothing for the empty batch
    assert all(j["args"][0]["shape"][0] == 1 and 0 not in j["args"][0]["dynamic"] for j in jobs)
    stored = {p.stem for p in built_store.glob("*.json")}
    assert not stored & {j["key"] for j in jobs}  # other keys than the batch >= 2 kernels


def test_a_builder_that_cannot_start_warns_once_and_compiles_in_memory(store_at, monkeypatch):
    store_at()
    monkeypatch.setattr(store, "_warned", set())
    monkeypatch.setattr(policy.background, "proc", None)
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")  # what Popen starts the builder with
    _falls_back_to_memory(normzoo.GroupNorm(2, 6), ((2, 6, 3, 11), (2, 6, 4, 11)), "could not be started")
    assert policy.info()["background"]["start_error"]


def test_batch_norm_training_that_updates_running_statistics_runs_store_kernels(store_at):
    """BatchNorm training that tracks running statistics: the store's kernels of the call without the update (no
    in-memory compile), the update from the batch statistics they return. Against the float64 oracle, at batch
    sizes in turn: y, the gradients, and the running mean and unbiased variance (EMA, and the cumulative average
    of momentum=None), to float32's rounding; num_batches_tracked counted. A constant channel (variance 0) keeps a
    running variance that is never negative."""
    store_at()
    for momentum in (0.1, None):
        torch.manual_seed(4)
        m = normzoo.BatchNorm2d(4, momentum=momentum)
        with torch.no_grad():
            m.weight.normal_()
            m.bias.normal_()
        ref = nn.BatchNorm2d(4, momentum=momentum).double()
        ref.load_state_dict(m.state_dict())
        summary = precompile(m, torch.randn(SHAPE, requires_grad=True), progress=False)
        assert summary["kernels"] == 2 and not summary["failed"], summary
        assert m.num_batches_tracked.item() == 0 and torch.equal(m.running_var, torch.ones(4))  # a copy ran
        before = compiling.cache_info()["compiles"], policy.info()
        for n in (3, 2, 5):
            x = torch.randn(n, *SHAPE[1:]) * 3 + 1
            x[:, 3] = 0.25  # a constant channel
            x.requires_grad_()
            x64 = x.detach().double().requires_grad_()
            dy = torch.randn(x.shape)
            y, y64 = m(x), ref(x64)
            y.backward(dy)
            y64.backward(dy.double())
            torch.testing.assert_close(y.double(), y64, rtol=0, atol=2e-6)
            torch.testing.assert_close(x.grad.double(), x64.grad, rtol=2e-6, atol=2e-6)
            torch.testing.assert_close(m.weight.grad.double(), ref.weight.grad, rtol=2e-6, atol=2e-6)
            got, want = m.running_mean.double(), ref.running_mean
            assert ((got - want).abs() / want.abs()).max() < 4e-7, (got, want)
            got, want = m.running_var.double(), ref.running_var  # float32's rounding, a few ulps; want[3]: 0.9 ** k, or 0
            assert ((got - want).abs() <= 4e-7 * want + 1e-12).all() and (got >= 0).all(), (got, want)
            m.weight.grad = ref.weight.grad = None
        assert m.num_batches_tracked.item() == 3
        info = policy.info()
        assert compiling.cache_info()["compiles"] == before[0]  # no in-memory compile
        assert info["store_loaded"] - before[1]["store_loaded"] == 2  # forward and backward, shared by the two
        assert info["eager_interim_calls"] == before[1]["eager_interim_calls"]
