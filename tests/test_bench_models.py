"""scripts/bench_models.py: the whole-model benchmark, run tiny (normzoo's engine eager, no whole-model compile)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import torch

import normzoo

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bench_models.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_models", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bm = _load()


@pytest.fixture
def tiny(monkeypatch):
    """The --quick settings at this process's thread count, with normzoo's kernels off (no compiles)."""
    monkeypatch.setenv("NORMZOO_COMPILE", "0")
    return bm.Settings(**{**bm.QUICK, "threads": torch.get_num_threads()})


def test_quick_run_times_every_case(tmp_path):
    """The script end to end: one row per model x norm x mode, each with both times and first-step times, and a
    header naming the CPU, its vector ISA, torch and the threads."""
    out_path = tmp_path / "bench.json"
    env = {**os.environ, "NORMZOO_COMPILE": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--compile", "eager", "--threads", "1", "--format", "json",
         "--output", str(out_path)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out_path.read_text())
    assert json.loads(out.stdout) == report
    env_ = report["environment"]
    assert env_["isa"] == torch.backends.cpu.get_cpu_capability() and env_["cpu"] and env_["torch"] == torch.__version__
    assert env_["normzoo_compile"] is False and report["settings"]["threads"] == 1
    got = {(r["model"], r["norm"], r["mode"], r["compile"]) for r in report["cases"]}
    want = {(m, n, mode, "eager") for m, n in [("resnet18", "bn"), ("resnet18", "gn"), ("resnet50", "bn"),
                                                ("resnet50", "gn"), ("vit", "ln")] for mode in ("train", "eval")}
    assert got == want and len(report["cases"]) == len(want)
    for r in report["cases"]:
        for side in ("torch", "normzoo"):
            assert r[side]["ms"] > 0 and r[side]["first_s"] >= 0 and r[side]["steps"] == 2, r
            assert r[side]["kernels"] == 0  # NORMZOO_COMPILE=0: nothing compiled
        assert r["ratio"] == pytest.approx(r["normzoo"]["ms"] / r["torch"]["ms"]) and r["note"] is None
    assert report["summary"]["not_timed"] == 0


def test_markdown_table_has_a_row_per_case(tiny, capsys):
    rows = [bm.run_case(bm.Case("vit", "ln", mode, "eager"), tiny) for mode in ("train", "eval")]
    report = bm.build_report(rows, tiny, bm.environment(tiny))
    text = bm.render(report, "markdown")
    assert f"vector ISA {torch.backends.cpu.get_cpu_capability()}" in text and f"torch {torch.__version__}" in text
    lines = [line for line in text.splitlines() if line.startswith("| ViT")]
    assert len(lines) == 2 and "| LayerNorm" in lines[0] and "| train" in lines[0] and "| eval" in lines[1]
    assert "| model " in text and "normzoo ms" in text and "ratio" in text


def test_models_take_the_norm_layer_everywhere():
    s = bm.Settings(**bm.QUICK)
    for name, norm, cls in [("resnet18", "bn", normzoo.BatchNorm2d), ("resnet50", "gn", normzoo.GroupNorm),
                            ("vit", "ln", normzoo.LayerNorm)]:
        ref, zoo = bm.build_pair(bm.Case(name, norm, "eval", "eager"), s)
        torch_norms = [m for m in ref.modules() if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm,
                                                                    torch.nn.LayerNorm))]
        zoo_norms = [m for m in zoo.modules() if isinstance(m, cls)]
        assert len(torch_norms) == len(zoo_norms) > 0
        assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm, torch.nn.LayerNorm))
                       for m in zoo.modules())
        assert ref.state_dict().keys() == zoo.state_dict().keys()
    assert bm._resnet_blocks([3, 4, 6, 3], bm.Settings(depth_scale=0.5)) == [2, 2, 3, 2]
    assert bm._resnet_blocks([3, 4, 6, 3], bm.Settings()) == [3, 4, 6, 3]


def test_a_different_model_fails_the_agreement_check(tiny, monkeypatch):
    """A normzoo model that computes something else (eps 0.1 for 1e-5) is caught before any timing, named."""
    case = bm.Case("resnet18", "bn", "eval", "eager")
    ref, zoo = bm.build_pair(case, tiny)
    x, _ = bm.make_inputs(case, tiny)
    bm.check_agreement(ref, zoo, x)  # the same function: passes
    monkeypatch.setitem(bm.NORMS, "bn", replace(bm.NORMS["bn"], zoo_layer=lambda s: partial(normzoo.BatchNorm2d,
                                                                                           eps=0.1)))
    ref, zoo = bm.build_pair(case, tiny)
    with pytest.raises(bm.AgreementError, match=r"eval forward: normzoo's output differs .*max abs diff"):
        bm.check_agreement(ref, zoo, x)
    row = bm.run_case(case, tiny)
    assert row["ratio"] is None and row["torch"]["ms"] is None and row["normzoo"]["ms"] is None
    assert "eval forward: normzoo's output differs" in row["note"] and "not timed" in row["note"]
    report = bm.build_report([row], tiny, bm.environment(tiny))
    assert report["summary"]["not_timed"] == 1 and "BatchNorm2d eval eager" in report["notes"][0]


class _OffInTraining(normzoo.BatchNorm2d):
    """Agrees in eval, adds 1e-2 in training: only the first train step can tell."""

    def forward(self, x):
        y = super().forward(x)
        return y + 1e-2 if self.training else y


def test_first_step_outputs_must_agree(tiny, monkeypatch):
    monkeypatch.setitem(bm.NORMS, "bn", replace(bm.NORMS["bn"], zoo_layer=lambda s: _OffInTraining))
    assert bm.run_case(bm.Case("resnet18", "bn", "eval", "eager"), tiny)["note"] is None
    row = bm.run_case(bm.Case("resnet18", "bn", "train", "eager"), tiny)
    assert row["ratio"] is None and "train eager, first step: normzoo's output differs" in row["note"]
    assert row["torch"]["first_s"] is not None  # the first steps ran (and were timed); nothing after them


def test_check_restores_compile_flags_and_modes(tiny):
    case = bm.Case("vit", "ln", "train", "eager")
    ref, zoo = bm.build_pair(case, tiny)
    ref.train(), zoo.train()
    bm.check_agreement(ref, zoo, bm.make_inputs(case, tiny)[0])
    assert ref.training and zoo.training
    assert all(m.compile is True for m in zoo.modules() if isinstance(m, normzoo.LayerNorm))


def test_own_forward_gives_each_instance_its_code():
    s = bm.Settings(**bm.QUICK)
    ref, zoo = bm.build_pair(bm.Case("vit", "ln", "eval", "eager"), s)
    x = bm.make_inputs(bm.Case("vit", "ln", "eval", "eager"), s)[0]
    before = ref(x)
    bm._own_forward(ref, "t1")
    assert ref.forward.__code__ is not type(ref).forward.__code__ and ref.forward.__code__.co_name == "forward_t1"
    torch.testing.assert_close(ref(x), before, rtol=0, atol=0)


@pytest.mark.parametrize("argv, message", [
    (["--models", "resnet18", "--norms", "ln"], "no case"),
    (["--models", "resnet34"], "--models: unknown"),
    (["--compile", "jit"], "--compile: unknown"),
    (["--norms", "gn", "--width", "48"], "divisible by 32"),
    (["--threads", "0"], "--threads must be at least 1"),
])
def test_bad_options_are_named(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bm.parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_quick_defaults_and_overrides():
    _, s, todo = bm.parse_args(["--quick", "--batch-size", "4", "--models", "vit"])
    assert s.batch_size == 4 and s.vit_dim == bm.QUICK["vit_dim"] and s.blocks == bm.QUICK["blocks"]
    assert [(c.norm, c.mode, c.compile) for c in todo] == [("ln", m, c) for m in bm.MODES for c in bm.COMPILE]
    _, s, todo = bm.parse_args([])
    assert s == bm.Settings() and len(todo) == 20


@pytest.mark.slow
def test_whole_model_compiled_quick(tmp_path):
    """The compiled path end to end (whole-model torch.compile, normzoo traced inline; minutes on a cold cache)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--models", "vit", "--modes", "train,eval", "--compile", "compiled",
         "--threads", "1", "--format", "json"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    for r in report["cases"]:
        assert r["ratio"] and r["note"] is None
        assert r["torch"]["graphs"] >= 1 and r["normzoo"]["graphs"] == r["torch"]["graphs"], r
        assert r["normzoo"]["kernels"] == 0  # traced inline: no kernel of normzoo's own
