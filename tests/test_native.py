"""The C++ autograd node (normzoo.native): once the extension and a signature's kernels are in the store, training
calls go through it, with the same numbers as the Python autograd.Function (the same kernels), double backward
included; and where the extension cannot be had, calls keep the Python path and say why once.

The tests that build the extension (~30 s of gcc) and its kernels are marked `native` and run in their own CI
step (`python -m pytest -m native`); the failure paths need no build and run in the default suite."""

import os
import subprocess
import sys
import threading
import warnings

import pytest
import torch
from torch import nn

import normzoo
from normzoo import builder, compiling, native, policy, store
from normzoo.precompile import jobs_for, precompile


@pytest.fixture
def fresh_native(monkeypatch):
    """A process state that has not looked for the extension yet (the module, if imported, stays imported)."""
    monkeypatch.setattr(native, "_state", native._State())
    monkeypatch.setattr(store, "_warned", set())
    monkeypatch.setenv(native.ENV_NATIVE, "1")


def test_a_builder_that_cannot_start_leaves_the_python_path_with_one_warning(fresh_native, tmp_path, monkeypatch):
    monkeypatch.setenv("NORMZOO_KERNEL_DIR", str(tmp_path))
    jobs = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert native.module(lambda job: jobs.append(job) or False, {}) is None
    assert jobs == [{"key": native.name(), "role": "native"}]
    assert native.status().startswith("failed: the background builder could not be started")
    assert [str(w.message) for w in caught if "C++ autograd node" in str(w.message)], [str(w.message) for w in caught]
    assert native.module(lambda job: pytest.fail("asked twice"), {}) is None  # failed once: not asked again


def test_a_failed_build_and_a_broken_entry_are_reported_not_imported(fresh_native, tmp_path, monkeypatch):
    monkeypatch.setenv("NORMZOO_KERNEL_DIR", str(tmp_path))
    asked = []
    assert native.module(lambda job: asked.append(job) or True, {}) is None and native.status() == "building"
    native._state.next_check = 0.0
    with pytest.warns(RuntimeWarning, match="building it failed .CompileError: no gcc."):
        native.module(asked.append, {native.name(): {"status": "failed", "error": "CompileError: no gcc"}})
    assert native.status() == "failed: building it failed (CompileError: no gcc)"

    monkeypatch.setattr(native, "_state", native._State())
    monkeypatch.setattr(store, "_warned", set())
    if native.name() in sys.modules:
        pytest.skip("the extension is already imported in this process")
    garbage = tmp_path / "garbage.so"
    garbage.write_bytes(b"not a shared library")
    store.commit(native.name(), native.fields(), garbage)  # a whole entry whose file does not import
    with pytest.warns(RuntimeWarning, match="does not import"):
        assert native.module(asked.append, {}) is None
    assert native.lookup() is None and not store.paths(native.name())[0].exists()  # removed: rebuilt later

    # a truncated file (dlopen of one can crash the process): its sha256 fails, it is removed before any import,
    # and the builder is asked for a new one
    monkeypatch.setattr(native, "_state", native._State())
    store.commit(native.name(), native.fields(), garbage)
    package = store.paths(native.name())[0]
    package.write_bytes(package.read_bytes()[:5])
    with pytest.warns(RuntimeWarning, match="invalid"):
        assert native.module(lambda job: asked.append(job) or True, {}) is None
    assert not package.exists() and asked[-1] == {"key": native.name(), "role": "native"}
    assert native.status() == "building"


def test_native_off_is_reported_and_calls_keep_the_python_function(monkeypatch):
    monkeypatch.setenv(native.ENV_NATIVE, "0")
    assert native.status() == "off" and policy.info()["native_node"] == "off"


# ---- with the extension built (marked: ~30 s of gcc, plus two kernels per signature) ----

SHAPE = (3, 8, 5, 6)


@pytest.fixture(scope="module")
def native_store(tmp_path_factory):
    """A store with the extension and the kernels of the layers below, built synchronously."""
    root = tmp_path_factory.mktemp("native-store")
    mp = pytest.MonkeyPatch()
    mp.setenv("NORMZOO_KERNEL_DIR", str(root))
    try:
        assert builder.build_native_once(root) == "built"
        gn, bn = _group_norm(), _batch_norm()
        x = torch.randn(SHAPE, requires_grad=True)
        assert not precompile(gn, x, progress=False)["failed"]
        x_cl = torch.randn(SHAPE).contiguous(memory_format=torch.channels_last).requires_grad_()
        for p in bn.parameters():
            p.requires_grad_(False)  # the backward kernel for dx only
        assert not precompile(bn, x_cl, progress=False)["failed"]
    finally:
        mp.undo()
    return root


def _group_norm():
    torch.manual_seed(5)
    m = normzoo.GroupNorm(4, 8)
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
    return m


def _batch_norm():
    torch.manual_seed(6)
    m = normzoo.BatchNorm2d(8).eval()
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
        m.running_mean.normal_()
        m.running_var.uniform_(0.5, 2.0)
    return m


@pytest.fixture
def use_store(native_store, fresh_native, monkeypatch):
    monkeypatch.setenv("NORMZOO_KERNEL_DIR", str(native_store))
    monkeypatch.setenv("NORMZOO_COMPILE", "1")
    policy.clear()
    yield native_store
    policy.clear()


def _through_python(layer, x):
    """The same call through the Python autograd.Function (what serves it before the node is there)."""
    kernel = next(iter(policy._kernels.values()))
    args = (x, layer.weight, layer.bias, getattr(layer, "running_mean", None), getattr(layer, "running_var", None),
            None)
    return compiling._CompiledNorm.apply(kernel, x, args[1], args[2], args[3:])


def _warm(layer, x, dy):
    """Calls until the node serves: the first loads the kernels and runs the Python function's backward."""
    for _ in range(3):
        layer(x).backward(dy)
    assert native.status() == "loaded", policy.info()
    y = layer(x)
    assert "NativeNormBackward" in y.grad_fn.name(), y.grad_fn.name()  # the C++ node's, not _CompiledNormBackward
    return y


def _warmed_group_norm():
    """The suite's GroupNorm, an input needing a gradient and a dy, after the calls that bring the node in; and the
    node's output for them."""
    m = _group_norm()
    x = torch.randn(SHAPE, requires_grad=True)
    dy = torch.randn(SHAPE)
    return m, x, dy, _warm(m, x, dy)


@pytest.mark.native
def test_the_node_gives_the_python_functions_numbers_bit_for_bit(use_store):
    m, x, dy, _ = _warmed_group_norm()
    grads = []
    for call in (m, lambda t: _through_python(m, t)):
        x.grad = None
        m.zero_grad(set_to_none=True)
        y = call(x)
        y.backward(dy)
        grads.append((y.detach(), x.grad, m.weight.grad, m.bias.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    # and both agree with the float64 oracle
    ref = nn.GroupNorm(4, 8).double()
    ref.load_state_dict(m.state_dict())
    x64 = x.detach().double().requires_grad_()
    ref(x64).backward(dy.double())
    assert (grads[0][1].double() - x64.grad).abs().max() < 1e-5
    assert (grads[0][2].double() - ref.weight.grad).abs().max() < 1e-4


@pytest.mark.native
def test_a_dy_in_another_layout_and_a_partial_set_of_needs(use_store):
    """BatchNorm2d eval on channels_last (running statistics as kernel inputs), only x needing a gradient; dy from
    sum() is an expanded tensor, copied to x's layout before the kernel reads it."""
    m = _batch_norm()
    for p in m.parameters():
        p.requires_grad_(False)
    x = torch.randn(SHAPE).contiguous(memory_format=torch.channels_last).requires_grad_()
    _warm(m, x, torch.randn(SHAPE))
    x.grad = None
    (m(x) * 1.0).sum().backward()
    via_node = x.grad
    x.grad = None
    _through_python(m, x).sum().backward()
    assert torch.equal(via_node, x.grad)
    expected = (m.weight / torch.sqrt(m.running_var + m.eps)).view(1, -1, 1, 1).expand(SHAPE)
    assert torch.allclose(via_node, expected, atol=1e-6)


@pytest.mark.native
def test_double_backward_through_the_node(use_store):
    m, x, dy, y = _warmed_group_norm()
    results = []
    for out in (y, _through_python(m, x)):
        (dx,) = torch.autograd.grad(out, x, dy, create_graph=True)
        results.append(torch.autograd.grad((dx * dx).sum(), (x, m.weight)))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    x64 = x.detach().double().requires_grad_()
    w64 = m.weight.detach().double().requires_grad_()
    y64 = torch.nn.functional.group_norm(x64, 4, w64, m.bias.detach().double())
    (dx64,) = torch.autograd.grad(y64, x64, dy.double(), create_graph=True)
    gx64, _ = torch.autograd.grad((dx64 * dx64).sum(), (x64, w64))
    assert (results[0][0].double() - gx64).abs().max() < 1e-4 * gx64.abs().max()


@pytest.mark.native
def test_the_node_keeps_autograds_safety_checks(use_store):
    """What torch.nn's nodes refuse, the node refuses: a saved tensor changed in place before the backward (the input,
    or the weight by an optimizer step), a second backward through a freed graph; a retained graph gives the same
    gradients twice, saved_tensors_hooks see what it saves, and forward-mode AD (which it has no rule for) goes
    around it."""
    m, x, dy, y = _warmed_group_norm()
    assert y.grad_fn.name() == "NativeNormBackward"
    h = x.detach().clone().requires_grad_()
    x1 = h * 1.0  # a non-leaf input, so it can be changed in place
    y = m(x1)
    assert y.grad_fn.name() == "NativeNormBackward"
    x1.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward(dy)
    y = m(x)
    assert y.grad_fn.name() == "NativeNormBackward"
    with torch.no_grad():
        m.weight.add_(0.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward(dy)
    y = m(x)
    first = torch.autograd.grad(y, (x, m.weight), dy, retain_graph=True)
    second = torch.autograd.grad(y, (x, m.weight), dy)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    with pytest.raises(RuntimeError, match="second time"):
        torch.autograd.grad(y, x, dy)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t.shape) or t, lambda t: t):
        y = m(x)
    assert y.grad_fn.name() == "NativeNormBackward" and tuple(SHAPE) in [tuple(s) for s in packed]
    (dx,) = torch.autograd.grad(y, x, dy)
    assert torch.equal(dx, first[0])
    import torch.autograd.forward_ad as fwAD
    v = torch.randn(SHAPE)
    with fwAD.dual_level():
        got = m(fwAD.make_dual(x, v))
        want = nn.functional.group_norm(fwAD.make_dual(x, v), 4, m.weight, m.bias)
        assert got.grad_fn.name() != "NativeNormBackward"
        torch.testing.assert_close(fwAD.unpack_dual(got).tangent, fwAD.unpack_dual(want).tangent)
    assert m(x).grad_fn.name() == "NativeNormBackward"  # and the next call is the node's again


@pytest.mark.native
def test_threads_share_the_node(use_store):
    m, x, dy, _ = _warmed_group_norm()
    (expected,) = torch.autograd.grad(m(x), x, dy)
    got, errors = [], []

    def work():
        try:
            for _ in range(20):
                xi = x.detach().requires_grad_()
                got.append(torch.autograd.grad(m(xi), xi, dy)[0])
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(got) == 60
    assert all(torch.equal(g, expected) for g in got)


@pytest.mark.native
def test_a_new_process_imports_the_extension_without_building(use_store):
    code = ("import torch, normzoo; from normzoo import native, policy\n"
            "m = normzoo.GroupNorm(4, 8); x = torch.randn(3, 8, 5, 6, requires_grad=True)\n"
            "for _ in range(3): m(x).sum().backward()\n"
            "print(native.status(), policy.info()['store_requested'], 'NativeNormBackward' in m(x).grad_fn.name())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, NORMZOO_NATIVE="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    status, requested, grad_fn = proc.stdout.split()
    assert (status, requested, grad_fn) == ("loaded", "0", "True"), proc.stdout


# ---- the layers' fast path: a signature served before runs the kernels with no Python past the layer ----


def _fast(m):
    fast = m.__dict__.get("_fast_path")
    return 0 if fast is None else len(fast)


@pytest.mark.native
def test_the_fast_path_serves_repeat_calls_with_the_python_paths_numbers(use_store):
    m, x, dy, _ = _warmed_group_norm()
    assert _fast(m) == 1
    with torch.no_grad():
        y_fast = m(x)
        y_python = policy.StoreKernel.forward(next(iter(policy._kernels.values())), (x, m.weight, m.bias, None,
                                                                                      None, None))[0]
    assert torch.equal(y_fast, y_python)
    x.grad = None
    m(x).backward(dy)
    fast_grad = x.grad
    x.grad = None
    _through_python(m, x).backward(dy)
    assert torch.equal(fast_grad, x.grad)


@pytest.mark.native
def test_calls_without_gradients_run_the_inference_kernel_bit_for_bit(use_store):
    """A signature first called without gradients gets the inference kernel (y alone), which the fast path runs: y
    bit for bit the forward kernel's. A signature whose forward kernel is loaded (a training layer's) serves its
    no-grad calls with that kernel and asks for no other."""
    m = _group_norm()
    x = torch.randn(SHAPE)
    jobs = jobs_for(m, x, grad=False)
    assert [job["role"] for job in jobs] == ["inference", "native"]
    assert not precompile(m, x, grad=False, progress=False)["failed"]
    policy.clear()
    with torch.no_grad():
        for _ in range(3):
            y = m(x)
    assert _fast(m) == 1
    (kernel,) = policy._kernels.values()
    assert kernel.entries["inference"].__class__ is store.Loaded and "forward" not in kernel.entries
    y_forward = kernel.forward((x, m.weight, m.bias, None, None, None))[0]  # the store's forward kernel
    assert torch.equal(y, y_forward)
    torch.testing.assert_close(y, nn.functional.group_norm(x, 4, m.weight, m.bias))

    policy.clear()
    trained = _group_norm()
    _warm(trained, x.requires_grad_(), torch.randn(SHAPE))
    requested = policy.info()["store_requested"]
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(trained(x), y)
    (kernel,) = policy._kernels.values()
    assert "inference" not in kernel.entries and policy.info()["store_requested"] == requested


@pytest.mark.native
def test_a_changed_setting_or_parameter_dtype_is_never_served_stale(use_store):
    """eps, activation and the parameters' dtype are not in the signature the C++ side checks for settings: setting
    any attribute drops the fast path; a dtype is in the signature."""
    m, x, _, _ = _warmed_group_norm()
    m.eps = 0.5
    assert _fast(m) == 0
    with torch.no_grad():
        torch.testing.assert_close(m(x), nn.functional.group_norm(x, 4, m.weight, m.bias, 0.5))
        m.activation = "relu"
        torch.testing.assert_close(m(x), torch.relu(nn.functional.group_norm(x, 4, m.weight, m.bias, 0.5)))
        m.activation = None
        m.eps = 1e-5
        for _ in range(2):
            m(x)  # relearned
        assert _fast(m) == 1
        m.weight.data = m.weight.data.double()  # not through setattr: the signature check sees it
        m.bias.data = m.bias.data.double()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = m(x)
        torch.testing.assert_close(y, nn.functional.group_norm(x.double(), 4, m.weight, m.bias).to(y.dtype))


@pytest.mark.native
def test_the_fast_path_reads_the_parameters_the_layer_would(use_store):
    """The fast path reads weight and bias from _parameters, past nn.Module.__getattr__: a parametrization's
    property, and a parameter swapped in _parameters itself (as Module.to may), are still what a call uses."""
    import torch.nn.utils.parametrize as parametrize

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    m, x, _, _ = _warmed_group_norm()
    with torch.no_grad():
        m._parameters["bias"] = nn.Parameter(m.bias + 1.0)  # not through setattr: the fast path stays
        assert _fast(m) == 1
        torch.testing.assert_close(m(x), nn.functional.group_norm(x, 4, m.weight, m.bias))
        parametrize.register_parametrization(m, "weight", Double())
        assert "weight" not in m._parameters
        for _ in range(3):  # relearned on the parametrized class
            torch.testing.assert_close(m(x), nn.functional.group_norm(x, 4, 2 * m.parametrizations.weight.original,
                                                                      m.bias))
    m, x, _, _ = _warmed_group_norm()

    class Halved(type(m)):  # a class attribute answers before nn.Module.__getattr__ would
        weight = property(lambda self: self._parameters["weight"] / 2)

    m.__class__ = Halved
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(m(x), nn.functional.group_norm(x, 4, m._parameters["weight"] / 2, m.bias))


@pytest.mark.native
def test_caches_cleared_modes_and_transforms_take_the_python_path(use_store, monkeypatch):
    m, x, _, _ = _warmed_group_norm()
    policy.clear()  # kernels leave the caches: every fast path forgets
    assert _fast(m) == 0
    _warm(m, x, torch.randn(SHAPE))
    monkeypatch.setenv("NORMZOO_COMPILE", "0")  # the eager engine now: no node, no fast path
    y = m(x)
    assert "NativeNormBackward" not in y.grad_fn.name()
    monkeypatch.setenv("NORMZOO_COMPILE", "1")
    ref = lambda t: nn.functional.group_norm(t, 4, m.weight, m.bias)  # noqa: E731
    got = torch.func.vmap(m)(x.detach().unsqueeze(0))[0]
    torch.testing.assert_close(got, ref(x.detach()))
    torch.testing.assert_close(torch.func.grad(lambda t: m(t).square().sum())(x.detach()),
                               torch.func.grad(lambda t: ref(t).square().sum())(x.detach()))


@pytest.mark.native
def test_the_fast_path_declines_transforms_and_tangents_on_a_learned_signature(use_store):
    """The fast path itself (C++) declines calls inside a torch.func transform and calls with a forward-mode tangent,
    even for a signature it has learned (vmap's inner x has the learned shape); a dual level with no tangent on any
    input is served, as it carries no tangent to lose."""
    import torch.autograd.forward_ad as fwAD

    m, x, dy, _ = _warmed_group_norm()
    ref = lambda t: nn.functional.group_norm(t, 4, m.weight, m.bias)  # noqa: E731
    assert _fast(m) == 1
    xs = x.detach().unsqueeze(0).expand(2, *SHAPE).clone()
    torch.testing.assert_close(torch.func.vmap(m)(xs), torch.func.vmap(ref)(xs))
    torch.testing.assert_close(torch.func.grad(lambda t: m(t).square().sum())(x.detach()),
                               torch.func.grad(lambda t: ref(t).square().sum())(x.detach()))
    v = torch.randn(SHAPE)
    with fwAD.dual_level():
        got = m(fwAD.make_dual(x.detach(), v))
        assert got.grad_fn is None or got.grad_fn.name() != "NativeNormBackward"
        torch.testing.assert_close(fwAD.unpack_dual(got).tangent,
                                   fwAD.unpack_dual(ref(fwAD.make_dual(x.detach(), v))).tangent)
        y = m(x)  # no tangent anywhere: the node serves
        assert y.grad_fn.name() == "NativeNormBackward"
        assert fwAD.unpack_dual(y).tangent is None
    assert m(x).grad_fn.name() == "NativeNormBackward"


@pytest.mark.native
def test_a_layer_with_a_fast_path_copies_and_pickles_without_it(use_store):
    import copy

    m, x, _, _ = _warmed_group_norm()
    for clone in (copy.deepcopy(m), torch.load(_saved(m), weights_only=False)):
        assert "_fast_path" not in clone.__dict__
        with torch.no_grad():
            assert torch.equal(clone(x), m(x))


def _saved(m):
    import io

    buffer = io.BytesIO()
    torch.save(m, buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.native
def test_batch_sizes_in_turn_other_needs_and_inference_mode(use_store):
    """Each batch size is its own entry of one fast path (one kernel serves them all); a call needing other
    gradients than the node's (here weight and bias only) takes the Python way and is right; so is inference
    mode."""
    m = _group_norm()
    _warm(m, torch.randn(SHAPE, requires_grad=True), torch.randn(SHAPE))
    for n in (2, 5, 3, 2):
        x = torch.randn(n, *SHAPE[1:], requires_grad=True)
        dy = torch.randn(x.shape)
        for _ in range(3):  # the first call of a size teaches, the later ones are served
            x.grad = None
            m(x).backward(dy)
        (expected,) = torch.autograd.grad(nn.functional.group_norm(x, 4, m.weight, m.bias), x, dy)
        torch.testing.assert_close(x.grad, expected)
    assert _fast(m) == 3
    x = torch.randn(SHAPE)  # no gradient for x: the weight's and the bias's only
    m.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m(x).square().sum().backward()
    w, b = m.weight.detach().requires_grad_(), m.bias.detach().requires_grad_()
    nn.functional.group_norm(x, 4, w, b).square().sum().backward()
    torch.testing.assert_close(m.weight.grad, w.grad)
    torch.testing.assert_close(m.bias.grad, b.grad)
    with torch.inference_mode():
        for _ in range(3):
            y = m(x)
        torch.testing.assert_close(y, nn.functional.group_norm(x, 4, m.weight, m.bias))


@pytest.mark.native
def test_a_batch_norm_in_eval_takes_the_fast_path_and_a_training_call_never_does(use_store):
    """BatchNorm eval reads its running statistics: they are in the signature the fast path checks, and read on every
    call (a change in place is seen). A training call that tracks running statistics must update them and count the
    batch: it takes the Python way even where the fast path holds eval's kernels (the mode set past __setattr__)."""
    m = _batch_norm()
    for p in m.parameters():
        p.requires_grad_(False)
    x = torch.randn(SHAPE).contiguous(memory_format=torch.channels_last).requires_grad_()
    dy = torch.randn(SHAPE)
    _warm(m, x, dy)
    assert _fast(m) == 1
    ref = lambda t: nn.functional.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias)  # noqa: E731
    with torch.no_grad():
        y_fast = m(x)
        y_python = policy.StoreKernel.forward(next(iter(policy._kernels.values())),
                                              (x, m.weight, m.bias, m.running_mean, m.running_var, None))[0]
        assert torch.equal(y_fast, y_python)
        m.running_mean.add_(1.0)  # in place, as load_state_dict does: the next call reads it
        m.running_var.mul_(2.0)
        torch.testing.assert_close(m(x), ref(x))
    assert _fast(m) == 1
    x.grad = None
    m(x).backward(dy)
    torch.testing.assert_close(x.grad, torch.autograd.grad(ref(x), x, dy)[0])
    running = m.running_mean.clone(), m.running_var.clone()
    m.__dict__.update(training=True, compile=False)  # not through __setattr__: the fast path stays
    assert _fast(m) == 1
    torch_bn = nn.BatchNorm2d(8)
    torch_bn.load_state_dict(m.state_dict())
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(m(x), torch_bn(x))
    assert m.num_batches_tracked.item() == 2
    torch.testing.assert_close(m.running_mean, torch_bn.running_mean)
    torch.testing.assert_close(m.running_var, torch_bn.running_var)
    assert not torch.equal(m.running_mean, running[0]) and not torch.equal(m.running_var, running[1])


@pytest.mark.native
def test_an_instance_norm_takes_the_fast_path_for_batched_inputs(use_store):
    m = normzoo.InstanceNorm2d(8, affine=True)
    x = torch.randn(SHAPE)
    assert not precompile(m, x, grad=False, progress=False)["failed"]
    with torch.no_grad():
        for _ in range(3):
            y = m(x)
        assert _fast(m) == 1
        torch.testing.assert_close(y, nn.functional.instance_norm(x, weight=m.weight, bias=m.bias))
        for _ in range(2):  # no batch dim: the input is not what the kernel is given; never learned
            torch.testing.assert_close(m(x[0]), nn.functional.instance_norm(x[:1], weight=m.weight,
                                                                            bias=m.bias)[0])
        assert _fast(m) == 1


@pytest.mark.native
def test_a_frozen_batch_norm_takes_the_fast_path_in_train_and_eval(use_store):
    """FrozenBatchNorm2d never updates its statistics: train and eval calls alike are served, with eval BatchNorm's
    numbers (the same kernels as the BatchNorm above)."""
    bn = _batch_norm()
    m = normzoo.FrozenBatchNorm2d(8)
    m.load_state_dict(bn.state_dict())
    x = torch.randn(SHAPE).contiguous(memory_format=torch.channels_last).requires_grad_()
    dy = torch.randn(SHAPE)
    for mode in (False, True):
        m.train(mode)
        _warm(m, x, dy)
        assert _fast(m) == 1
        x.grad = None
        m(x).backward(dy)
        with torch.no_grad():
            y = m(x)
        torch.testing.assert_close(y, nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight,
                                                               bn.bias))
        torch.testing.assert_close(x.grad, torch.autograd.grad(bn(x), x, dy)[0])
