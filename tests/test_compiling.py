"""The compile policy: compiled by default, per-signature kernels in a bounded cache, no eager fallback, one op
inside a user's torch.compile, and a loud fallback when no C++ compiler exists."""

import warnings

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import normzoo
from normzoo import compiling


def test_layers_run_compiled_by_default_and_reuse_kernels():
    m = normzoo.GroupNorm(2, 4)
    x = torch.randn(2, 4, 3, 5)
    before = compiling.cache_info()["compiles"]
    m(x)
    assert compiling.cache_info()["compiles"] == before + 1
    m(x + 1)
    normzoo.GroupNorm(2, 4)(x)  # another instance, same signature: same kernel
    assert compiling.cache_info()["compiles"] == before + 1


def test_compile_false_and_env_var_turn_compilation_off(monkeypatch):
    x = torch.randn(2, 4, 3, 7)
    before = compiling.cache_info()["compiles"]
    normzoo.GroupNorm(2, 4, compile=False)(x)
    monkeypatch.setenv("NORMZOO_COMPILE", "0")
    normzoo.GroupNorm(2, 4)(x)
    assert compiling.cache_info()["compiles"] == before


def test_many_shapes_never_hit_dynamos_recompile_limit(monkeypatch):
    """12 shapes through one layer with static kernels only: 12 kernels, none falling back to eager after
    dynamo's 8."""
    monkeypatch.setenv("NORMZOO_CACHE_SIZE", "5")
    monkeypatch.setenv("NORMZOO_DYNAMIC_BATCH", "0")
    m = normzoo.LayerNorm(8)
    graphs = counters["stats"]["unique_graphs"]
    before = compiling.cache_info()
    with torch.no_grad():
        for rows in range(2, 14):
            x = torch.randn(rows, 8)
            torch.testing.assert_close(m(x), nn.functional.layer_norm(x, (8,)))
    info = compiling.cache_info()
    assert info["compiles"] - before["compiles"] == 12
    assert counters["stats"]["unique_graphs"] - graphs == 12  # each shape got a real Inductor graph
    assert info["signatures"] <= 5 and info["evictions"] - before["evictions"] >= 7
    assert info["compile_seconds"] > before["compile_seconds"]


def test_missing_cxx_compiler_warns_once_and_stays_correct(monkeypatch):
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(compiling._state, "broken", None)
    x = torch.randn(3, 6, 11)  # a signature no other test compiles
    no_compiler = inductor_config.patch({"cpp.cxx": (None, "/nonexistent/g++"), "fx_graph_cache": False})
    with no_compiler, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = normzoo.GroupNorm(3, 6)(x)
        y2 = normzoo.GroupNorm(3, 6)(x * 2)
    torch.testing.assert_close(y, nn.functional.group_norm(x, 3))
    torch.testing.assert_close(y2, nn.functional.group_norm(x * 2, 3))
    msgs = [str(w.message) for w in caught if "torch.compile failed" in str(w.message)]
    assert len(msgs) == 1 and "eagerly" in msgs[0]
    assert compiling.cache_info()["compile_disabled_reason"]


class SmallNet(nn.Module):
    def __init__(self, lib):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = lib.GroupNorm(4, 8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = lib.BatchNorm2d(8)
        self.inorm = lib.InstanceNorm2d(8, affine=True)
        self.ln = lib.LayerNorm(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.gn(self.conv1(x)))
        x = torch.relu(self.inorm(self.bn(self.conv2(x))))
        return self.head(self.ln(x.mean((2, 3))))


@pytest.fixture
def no_graph_caches():
    """Inductor's FX graph cache and AOTAutograd's cache off (their own patch(): a monkeypatched config attribute
    of theirs is not restored to a working state)."""
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        yield


def test_zoo_net_compiles_fullgraph_and_matches_torch_net(monkeypatch, no_graph_caches):
    """Also: the norm ops take Inductor's channels_last convolution outputs as they are (`flexible_layout`), with
    no copy to NCHW and back, and compute the same as torch.nn on them."""
    from normzoo import builder, graph_ops

    layouts = []
    runtime = graph_ops.runtime
    monkeypatch.setattr(graph_ops, "runtime", lambda spec, args: layouts.append(builder.layout_of(args[0])) or
                        runtime(spec, args))
    # no_graph_caches: a graph cached by an earlier normzoo (before the tag) would keep its copies, since the caches
    # do not key on op tags
    torch.manual_seed(1)
    ref = SmallNet(nn)
    zoo = SmallNet(normzoo)
    zoo.load_state_dict(ref.state_dict(), strict=True)
    compiled = torch.compile(zoo, fullgraph=True)
    graphs, own = counters["stats"]["unique_graphs"], compiling.cache_info()["compiles"]
    for step, mode in enumerate(["train", "eval", "train", "eval", "train"]):
        zoo.train(mode == "train")
        ref.train(mode == "train")
        x = torch.randn(4, 3, 8, 8)
        out_z, out_r = compiled(x), ref(x)
        torch.testing.assert_close(out_z, out_r, atol=1e-5, rtol=1e-4)
        if mode == "train":
            out_z.square().sum().backward()
            out_r.square().sum().backward()
            for (name, pz), pr in zip(zoo.named_parameters(), ref.parameters()):
                torch.testing.assert_close(pz.grad, pr.grad, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
                pz.grad = pr.grad = None
    for (name, bz), br in zip(zoo.named_buffers(), ref.buffers()):
        torch.testing.assert_close(bz, br, msg=lambda m: f"{name}: {m}")
    assert "channels_last" in layouts, layouts  # the GroupNorm after conv1, forward and backward
    # train/eval switches: one graph per mode, no recompile storm (normzoo's own kernels, compiled when the ops
    # first run, are graphs of their own)
    own = compiling.cache_info()["compiles"] - own
    assert counters["stats"]["unique_graphs"] - graphs - own <= 2


def test_concurrent_first_calls_compile_once_per_signature():
    """Four threads meet three new signatures at once: three forward compiles, right answers in every thread."""
    import threading

    shapes = [(2, 6, 5, 3), (2, 6, 5, 4), (2, 6, 5, 6)]  # three spatial sizes: three kernels
    inputs = [torch.randn(s) for s in shapes]
    layer = normzoo.GroupNorm(3, 6)
    before = compiling.cache_info()["compiles"]
    errors, barrier = [], threading.Barrier(4)

    def work():
        barrier.wait()
        try:
            with torch.no_grad():
                for x in inputs:
                    torch.testing.assert_close(layer(x), nn.functional.group_norm(x, 3, layer.weight, layer.bias))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert compiling.cache_info()["compiles"] - before == 3


def test_one_kernel_serves_every_sequence_length_and_batch_size():
    """The shape policy: layer norms compile once for every row count, channel norms once for every batch size
    (>= 2), forward and backward, with the right answer at each size; spatial sizes still get their own kernel."""
    ln = normzoo.LayerNorm(24)
    before = compiling.cache_info()["compiles"]
    for length in range(2, 102):  # 100 distinct sequence lengths, batch 3
        x = torch.randn(3, length, 24, requires_grad=True)
        y = ln(x)
        dy = torch.randn_like(x)
        grads = torch.autograd.grad(y, (x, ln.weight, ln.bias), dy)
        # against the float64 oracle, at float32's default tolerances: the weight and bias gradients are summed in
        # blocks of 16 rows (6 to 303 rows here: less than one block, whole and partial ones), and the zero padding
        # must add nothing
        params = [p.detach().double().requires_grad_() for p in (ln.weight, ln.bias)]
        xr = x.detach().double().requires_grad_()
        yr = nn.functional.layer_norm(xr, (24,), *params)
        refs = torch.autograd.grad(yr, [xr] + params, dy.double())
        torch.testing.assert_close(y, yr.float())
        for g, r in zip(grads, refs):
            torch.testing.assert_close(g, r.float())
    assert compiling.cache_info()["compiles"] - before == 2  # one forward, one backward
    x = torch.randn(3, 1500, 24, requires_grad=True)  # 4500 rows: past any size a kernel might have assumed
    y = ln(x)
    grads = torch.autograd.grad(y.square().sum(), (x, ln.weight, ln.bias))
    xr = x.detach().requires_grad_()
    yr = nn.functional.layer_norm(xr, (24,), ln.weight, ln.bias)
    for g, r in zip(grads, torch.autograd.grad(yr.square().sum(), (xr, ln.weight, ln.bias))):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
    assert not hasattr(x, "_dynamo_dynamic_indices")  # our marks are not left on the caller's tensors

    gn = normzoo.GroupNorm(2, 6)
    before = compiling.cache_info()["compiles"]
    with torch.no_grad():
        for n in (2, 3, 7, 4):
            x = torch.randn(n, 6, 5, 4)
            torch.testing.assert_close(gn(x), nn.functional.group_norm(x, 2, gn.weight, gn.bias))
        assert compiling.cache_info()["compiles"] - before == 1
        gn(torch.randn(3, 6, 4, 4))  # another spatial size: its own kernel
        assert compiling.cache_info()["compiles"] - before == 2


def test_batchnorm_kernel_reused_across_batch_sizes_keeps_running_statistics_right():
    """One BatchNorm kernel serves every batch size: outputs, gradients and the running statistics (EMA and the
    cumulative average, whose unbiased factor depends on the batch size) match torch.nn at each size."""
    pairs = [(normzoo.BatchNorm2d(8), nn.BatchNorm2d(8)), (normzoo.BatchNorm2d(8, momentum=None),
                                                           nn.BatchNorm2d(8, momentum=None))]
    for n in (2, 5, 3, 2):
        x = torch.randn(n, 8, 3, 5) * 3 + 2
        for zoo, ref in pairs:
            xz, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
            yz, yr = zoo(xz), ref(xr)
            torch.testing.assert_close(yz, yr, rtol=1e-5, atol=1e-5)
            (gz,), (gr,) = torch.autograd.grad(yz.square().sum(), xz), torch.autograd.grad(yr.square().sum(), xr)
            torch.testing.assert_close(gz, gr, rtol=1e-4, atol=1e-4)
            for bz, br in zip(zoo.buffers(), ref.buffers()):
                torch.testing.assert_close(bz, br)


def test_user_compile_keeps_aot_autograd_cacheable():
    """Inside a user's torch.compile the engine traces as plain ops: no autograd.Function, so AOTAutograd can
    cache the user's graph (a bypass would repeat its tracing in every process)."""
    torch.manual_seed(0)
    zoo = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), normzoo.GroupNorm(4, 8), nn.ReLU())
    ref = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU())
    ref.load_state_dict(zoo.state_dict())
    bypass = counters["aot_autograd"]["autograd_cache_bypass"]
    x = torch.randn(2, 3, 6, 6)
    out = torch.compile(zoo, fullgraph=True)(x)
    out.square().sum().backward()
    ref(x).square().sum().backward()
    assert counters["aot_autograd"]["autograd_cache_bypass"] == bypass
    torch.testing.assert_close(out, ref(x), atol=1e-5, rtol=1e-4)
    for pz, pr in zip(zoo.parameters(), ref.parameters()):
        torch.testing.assert_close(pz.grad, pr.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("hw", [(16, 16), (14, 14)])  # 256 positions: 16 whole blocks; 196: the last one padded
def test_channels_last_channel_sums_in_blocks_of_positions_match_the_float64_oracle(hw):
    """On channels_last input with 128 or more channels the compiled kernels sum each channel's positions in blocks
    of 16 (engine._channel_sums), the last one padded with zeros: y, dx, dweight, dbias and the running variance
    against the float64 oracle, at float32's default tolerances, with a mean of 1e3."""
    torch.manual_seed(0)
    for zoo, ref in ((normzoo.GroupNorm(8, 128), nn.GroupNorm(8, 128)), (normzoo.BatchNorm2d(128), nn.BatchNorm2d(128))):
        with torch.no_grad():
            for p in zoo.parameters():
                p.uniform_(0.5, 1.5)
        ref.load_state_dict(zoo.state_dict())
        ref.double()
        x = (torch.randn(2, 128, *hw) * 2 + 1e3).contiguous(memory_format=torch.channels_last).requires_grad_()
        dy = torch.randn_like(x)
        y = zoo(x)
        grads = torch.autograd.grad(y, (x, zoo.weight, zoo.bias), dy)
        xr = x.detach().double().requires_grad_()
        yr = ref(xr)
        refs = torch.autograd.grad(yr, (xr, ref.weight, ref.bias), dy.double())
        torch.testing.assert_close(y, yr.float())
        for g, r in zip(grads, refs):
            torch.testing.assert_close(g, r.float())
        for (name, bz), br in zip(zoo.named_buffers(), ref.buffers()):
            torch.testing.assert_close(bz, br.to(bz.dtype), msg=lambda m: f"{name}: {m}")


def test_user_compile_backward_of_inline_batch_norm_has_no_shift_path():
    """BatchNorm training traced inline in a user's torch.compile: the shift is detached (the norm does not depend
    on it), so the derived backward carries no full-size zero scattered from the first elements (aten.slice_backward:
    two extra passes over the activation) and its gradients still match torch.nn's."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    backward_ops = []

    def backend(gm, example_inputs):
        def bw_compiler(bw, _):
            backward_ops.extend(str(n.target) for n in bw.graph.nodes if n.op == "call_function")
            return make_boxed_func(bw.forward)

        return aot_module_simplified(gm, example_inputs, fw_compiler=lambda fw, _: make_boxed_func(fw.forward),
                                     bw_compiler=bw_compiler)

    torch.manual_seed(0)
    zoo, ref = normzoo.BatchNorm2d(6), nn.BatchNorm2d(6)
    x = (torch.randn(3, 6, 4, 5) * 2 + 7).requires_grad_()
    torch._dynamo.reset()
    (gz,) = torch.autograd.grad(torch.compile(zoo, backend=backend, fullgraph=True)(x).square().sum(), x)
    (gr,) = torch.autograd.grad(ref(x).square().sum(), x)
    assert backward_ops and not [t for t in backward_ops if "slice_backward" in t], backward_ops
    torch.testing.assert_close(gz, gr, atol=1e-4, rtol=1e-4)
    for (name, bz), br in zip(zoo.named_buffers(), ref.buffers()):
        torch.testing.assert_close(bz, br, msg=lambda m: f"{name}: {m}")


def test_user_compile_computes_inline_batch_norm_coefficients_and_their_gradients_once(no_graph_caches):
    """BatchNorm training inside a user's torch.compile traces the engine inline (it updates its running buffers).
    Its per-channel coefficients, and the gradients of its per-channel sums, are buffers (engine.stored through
    normzoo::realized, which Inductor decomposes into its own op): the loops over the positions compute no rsqrt
    or division per element vector, no normzoo op is called at run time, AOTAutograd still caches the graph, and
    the values are the float64 oracle's at a mean of 1e3."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    zoo = normzoo.BatchNorm2d(16)
    with torch.no_grad():
        zoo.weight.normal_()
        zoo.bias.normal_()
    ref = nn.BatchNorm2d(16).double()
    ref.load_state_dict(zoo.state_dict())
    x = (torch.randn(4, 16, 8, 8) * 2 + 1e3).contiguous(memory_format=torch.channels_last).requires_grad_()
    dy = torch.randn(4, 16, 8, 8)
    bypass = counters["aot_autograd"]["autograd_cache_bypass"]
    compiled = torch.compile(zoo, fullgraph=True)
    (y, *grads), codes = run_and_get_code(lambda: (lambda y: (y,) + torch.autograd.grad(
        y, (x, zoo.weight, zoo.bias), dy))(compiled(x)))
    assert counters["aot_autograd"]["autograd_cache_bypass"] == bypass
    assert not any("normzoo.realized" in code for code in codes)
    quotes = "'" * 3  # around each kernel's C++ source in Inductor's output code
    kernels = [kernel.split(quotes)[0] for code in codes for kernel in code.split("r" + quotes)[1:]]
    loops = [loop for kernel in kernels for loop in kernel.split("#pragma omp for")[1:]]
    over_positions = [loop for loop in loops if "<static_cast<int64_t>(256L)" in loop.split("\n")[1]]
    assert len(over_positions) == 2, kernels  # the normalize, and dx
    for loop in over_positions:
        assert "sqrt" not in loop and " / " not in loop, loop
    x64 = x.detach().double().requires_grad_()
    y64 = ref(x64)
    want = torch.autograd.grad(y64, (x64, ref.weight, ref.bias), dy.double())
    for got, expected in zip([y] + grads, [y64] + list(want)):
        assert ((got.double() - expected).abs().max() / expected.abs().max()).item() < 2e-6
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(zoo, name).double(), getattr(ref, name), rtol=1e-6, atol=1e-6)


_THREADS_CHILD = """
import json, sys, torch, normzoo
from torch._dynamo.utils import counters
torch.set_num_threads(int(sys.argv[1]))
x = torch.randn(2, 6, 5, 7, requires_grad=True)
normzoo.GroupNorm(3, 6)(x).sum().backward()
print(json.dumps({k: counters["inductor"][k] for k in ("fxgraph_cache_hit", "fxgraph_cache_miss")}))
"""


def test_another_thread_count_reuses_the_cached_kernels(tmp_path):
    """Kernels read the thread count at run time: a second process with another thread count loads them from
    Inductor's cache instead of compiling them again."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    runs = []
    for threads in (1, 2):
        proc = subprocess.run([sys.executable, "-c", _THREADS_CHILD, str(threads)], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert runs[0]["fxgraph_cache_miss"] == 2  # forward and backward, compiled at 1 thread
    assert runs[1] == {"fxgraph_cache_hit": 2, "fxgraph_cache_miss": 0}


def test_a_seen_call_takes_its_kernel_only_while_mode_and_cache_still_give_it(monkeypatch):
    """Repeated calls skip the kernel choice (normzoo.policy's call plans); a plan must never outlive what chose it:
    a mode switched at run time applies to the next call, and a cleared or evicted kernel is compiled again."""
    m = normzoo.LayerNorm(6)
    x = torch.randn(3, 5, 6)  # a signature no other test compiles
    ref = nn.functional.layer_norm(x, (6,), m.weight, m.bias)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref)
        info = compiling.cache_info()
        torch.testing.assert_close(m(x), ref)  # the plan: a hit on the same kernel
        assert compiling.cache_info()["hits"] == info["hits"] + 1
        monkeypatch.setenv("NORMZOO_COMPILE", "0")
        torch.testing.assert_close(m(x), ref)  # eager: no kernel asked for
        assert compiling.cache_info()["hits"] == info["hits"] + 1
        monkeypatch.setenv("NORMZOO_COMPILE", "sync")
        m(x)
        assert compiling.cache_info()["hits"] == info["hits"] + 2
        compiling.clear_cache()
        torch.testing.assert_close(m(x), ref)  # a new kernel object for the signature: its graph compiles again
        assert compiling.cache_info()["compiles"] == info["compiles"] + 1
        m.double()  # the parameters' dtype is in the plan's key
        torch.testing.assert_close(m(x.double()), nn.functional.layer_norm(x.double(), (6,), m.weight, m.bias))


def test_user_compile_sees_each_norm_as_one_op_and_export_keeps_the_engine_inline():
    """In a user's torch.compile a norm is one opaque op (normzoo.graph_ops: little for dynamo and Inductor to trace),
    whose outputs and gradients match torch.nn's; BatchNorm (eval, and training that updates its buffers) stays
    inline, and so does everything under torch.export; double backward through the compiled graph is torch.compile's
    own error."""
    from torch._dynamo.backends.registry import lookup_backend

    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return lookup_backend("aot_eager")(gm, example_inputs)

    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    for zoo, ref, ops in ((normzoo.GroupNorm(4, 8), nn.GroupNorm(4, 8), 1), (normzoo.BatchNorm2d(8), nn.BatchNorm2d(8), 0),
                          (normzoo.BatchNorm2d(8).eval(), nn.BatchNorm2d(8).eval(), 0)):
        with torch.no_grad():
            for p in zoo.parameters():
                p.uniform_(0.5, 1.5)
        ref.load_state_dict(zoo.state_dict())
        seen.clear()
        torch._dynamo.reset()
        y = torch.compile(zoo, backend=backend, fullgraph=True)(x)
        assert sum("normzoo.norm" in t for t in seen) == ops, seen
        assert y.is_contiguous(memory_format=torch.channels_last)
        (gz,) = torch.autograd.grad(y.square().sum(), x)
        yr = ref(x)
        (gr,) = torch.autograd.grad(yr.square().sum(), x)
        torch.testing.assert_close(y, yr, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(gz, gr, atol=1e-4, rtol=1e-4)
        for (name, bz), br in zip(zoo.named_buffers(), ref.buffers()):
            torch.testing.assert_close(bz, br, msg=lambda m: f"{name}: {m}")
    gn = torch.compile(normzoo.GroupNorm(4, 8), backend="aot_eager")
    (g,) = torch.autograd.grad(gn(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()
    program = torch.export.export(nn.Sequential(normzoo.GroupNorm(4, 8)), (torch.randn(2, 8, 5, 5),))
    assert not [n for n in program.graph.nodes if "normzoo" in str(n.target)]


@pytest.mark.parametrize("groups, affine", [(8, True), (16, False)])
def test_contiguous_group_norm_forward_reads_x_in_one_parallel_loop(groups, affine, no_graph_caches):
    """The statistics and the normalize of a contiguous GroupNorm share one loop over the (sample, group) rows
    (engine._group_forward_one_pass): x is read in one parallel loop, not in one for the sums and one for y. And the
    values are the norm's: against the float64 oracle, and against the eager engine."""
    from torch._inductor.utils import run_and_get_code

    from normzoo import engine

    torch.manual_seed(0)
    x = torch.randn(2, 32, 32, 32) * 3 + 100  # groups of 2-4 maps of 32x32: rows long enough for the fusion
    weight, bias = (torch.randn(32), torch.randn(32)) if affine else (None, None)
    spec = engine.NormSpec(groups=groups, eps=1e-5, activation="silu" if affine else None)
    fn = torch.compile(lambda *t: engine.forward_inference(spec, *t), dynamic=False, fullgraph=True)
    (y, shift, mean_d, rstd), codes = run_and_get_code(fn, x, weight, bias)
    kernel = next(code for code in codes if "#pragma omp for" in code)
    loops_reading_x = [part for part in kernel.split("#pragma omp for")[1:] if "in_ptr0" in part]
    assert len(loops_reading_x) == 1, kernel
    eager = engine.forward_inference(spec, x, weight, bias)
    for got, want in zip((y, shift, mean_d, rstd), eager):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    w64 = None if weight is None else weight.double()
    b64 = None if bias is None else bias.double()
    oracle = nn.functional.group_norm(x.double(), groups, w64, b64, 1e-5)
    oracle = nn.functional.silu(oracle) if affine else oracle
    assert (y.double() - oracle).abs().max().item() < 1e-5


@pytest.mark.parametrize("case", ["ln768", "ln2d_channels_last"])
def test_layer_norm_forward_reads_x_in_one_parallel_loop(case, no_graph_caches):
    """A layer norm's shift, sums, statistics and output share one loop over the rows (engine._layer_forward_one_pass):
    x is read in one parallel loop, not in one for the sums and one for y. And the values are the norm's: against
    the eager engine (statistics too, in the shapes and memory format the backward takes) and the float64 oracle,
    at a mean of 100."""
    from torch._inductor.utils import run_and_get_code

    from normzoo import engine

    torch.manual_seed(0)
    if case == "ln768":  # rows longer than sum_dim's one-level sums (512)
        x, n, spec = torch.randn(2, 40, 768) * 3 + 100, 768, engine.NormSpec(groups=None, eps=1e-5, dims=(-1,))
        moved = lambda t: t  # noqa: E731
    else:  # 96 channels at each of 5x7 positions, the channels innermost in memory
        x = (torch.randn(2, 96, 5, 7) * 3 + 100).contiguous(memory_format=torch.channels_last)
        n, spec = 96, engine.NormSpec(groups=None, eps=1e-6, dims=(1,), activation="gelu")
        moved = lambda t: t.permute(0, 2, 3, 1)  # noqa: E731
    weight, bias = torch.randn(n), torch.randn(n)
    fn = torch.compile(lambda *t: engine.forward_inference(spec, *t), dynamic=False, fullgraph=True)
    out, codes = run_and_get_code(fn, x, weight, bias)
    kernel = next(code for code in codes if "#pragma omp for" in code)
    loops_reading_x = [part for part in kernel.split("#pragma omp for")[1:] if "in_ptr0" in part]
    assert len(loops_reading_x) == 1, kernel
    eager = engine.forward_inference(spec, x, weight, bias)
    assert out[0].stride() == eager[0].stride() == x.stride()  # y in x's memory format
    for got, want in zip(out[1:], eager[1:]):  # statistics in the shape and layout the backward takes them
        assert got.shape == want.shape and got.is_contiguous()
    # the shift is any value near the mean (its float32 sum may round apart from eager's): the mean is shift + mean_d
    (y, shift, mean_d, rstd), (y_e, shift_e, mean_d_e, rstd_e) = out, eager
    for got, want in ((y, y_e), (shift + mean_d, shift_e + mean_d_e), (rstd, rstd_e)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    oracle = nn.functional.layer_norm(moved(x).double(), (n,), weight.double(), bias.double(), spec.eps)
    if spec.activation:
        oracle = nn.functional.gelu(oracle)
    assert (moved(out[0]).double() - oracle).abs().max().item() < 1e-5


def test_layer_norm_backward_reads_each_row_in_one_parallel_loop(no_graph_caches):
    """The row sums of a layer norm's backward and its dx share one loop over the rows (engine.ONE_ROW_PASS_MAX):
    x and dy are read there once, not once for the sums and again for dx. And the gradients are the norm's: against
    the eager engine and the float64 oracle. dx alone (a frozen affine): with weight or bias gradients to sum, the
    blocked pass below serves."""
    from torch._inductor.utils import run_and_get_code

    from normzoo import engine

    torch.manual_seed(0)
    n = 768  # longer than sum_dim's one-level rows (512): the case the one-level sums are there for
    x = torch.randn(2, 64, n) * 3 + 100
    weight, bias, dy = torch.randn(n), torch.randn(n), torch.randn(2, 64, n)
    spec = engine.NormSpec(groups=None, eps=1e-5, dims=(-1,))
    with torch.no_grad():
        stats = engine.statistics(spec, x)
    needs = (True, False, False)
    fn = torch.compile(lambda *t: engine.backward(spec, needs, *t), dynamic=False, fullgraph=True)
    grads, codes = run_and_get_code(fn, x, weight, bias, *stats, dy)
    kernel = next(code for code in codes if "#pragma omp for" in code)
    rows = f"x0<static_cast<int64_t>({x.numel() // n}L);"  # a parallel loop over the 128 rows
    loops_over_rows = [part for part in kernel.split("#pragma omp for")[1:] if rows in part.split("\n", 2)[1]]
    assert len(loops_over_rows) == 1, kernel
    for got, want in zip(grads, engine.backward(spec, needs, x, weight, bias, *stats, dy)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert grads[1:] == (None, None)
    x64 = x.double().requires_grad_()
    oracle = torch.autograd.grad(nn.functional.layer_norm(x64, (n,), weight.double(), bias.double(), 1e-5), x64,
                                 dy.double())[0]
    assert ((grads[0].double() - oracle).abs().max() / oracle.abs().max()).item() < 1e-6


@pytest.mark.parametrize("case", ["layer_norm", "rms_norm"])
def test_layer_norm_backward_sums_columns_in_its_row_pass(case, no_graph_caches):
    """With a weight or bias gradient to sum, a layer norm's backward reads x and dy in one parallel loop nest
    (engine._layer_backward_blocked): each block's column sums, then its rows' sums and dx, while the block is in
    cache. The row count is symbolic (as the store builds kernels) and no multiple of the block: the repeated rows past
    the end and before the start add exact zeros, so an infinite dy in the last or the first row gives torch's
    infinite dbias, not NaN. Gradients against the eager engine and the float64 oracle."""
    from torch._inductor.utils import run_and_get_code

    from normzoo import engine

    torch.manual_seed(0)
    # chunks of one vector (512 / 16 = 32: two), and of one vector and a masked tail (384 / 16 = 24)
    n, tol = 512 if case == "layer_norm" else 384, 1e-6
    spec = engine.NormSpec(groups=None, eps=1e-5, dims=(-1,), center=case == "layer_norm")
    x = torch.randn(3, 7, n) * 3 + 100
    weight, bias, dy = torch.randn(n), torch.randn(n), torch.randn(3, 7, n)
    with torch.no_grad():
        stats = engine.statistics(spec, x)
    needs = (True, True, True)
    for t in (x, dy, *stats):  # the rows symbolic
        torch._dynamo.mark_dynamic(t, [0, 1])
    fn = torch.compile(lambda *t: engine.backward(spec, needs, *t), dynamic=False, fullgraph=True)
    grads, codes = run_and_get_code(fn, x, weight, bias, *stats, dy)
    kernel = next(code for code in codes if "#pragma omp for" in code)
    loops_reading_inputs = [part for part in kernel.split("#pragma omp for")[1:] if "in_ptr" in part]
    assert len(loops_reading_inputs) == 1, kernel  # (the column sums' second level reads the blocks' sums alone)
    assert grads[0].shape == x.shape and grads[0].stride() == x.stride()
    eager = engine.backward(spec, needs, x, weight, bias, *stats, dy)
    for got, want in zip(grads, eager):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())

    x64, w64, b64 = (t.double().requires_grad_() for t in (x, weight, bias))
    if spec.center:
        y64 = nn.functional.layer_norm(x64, (n,), w64, b64, spec.eps)
    else:
        y64 = nn.functional.rms_norm(x64, (n,), w64, spec.eps) + b64
    for got, want in zip(grads, torch.autograd.grad(y64, (x64, w64, b64), dy.double())):
        assert ((got.double() - want).abs().max() / want.abs().max()).item() < tol
    dy[-1, -1, 0], dy[0, 0, 1] = float("inf"), -float("inf")  # the rows repeated past the end and before the start
    dbias = fn(x, weight, bias, *stats, dy)[2]
    assert dbias[0].item() == float("inf") and dbias[1].item() == -float("inf") and dbias[2:].isfinite().all()
    torch.testing.assert_close(dbias[2:], grads[2][2:], rtol=0, atol=0)
