"""The speed sweep: schema, report formats, plot, and that no contender is timed before it agrees with torch.

No timing thresholds: timings on a shared machine say nothing about correctness.
"""

import csv
import io
import json

import pytest
import torch
import yaml

import normzoo
from normzoo import cli
from normzoo.sweeps import grid, speed
from normzoo.sweeps import report as rp

SWEEP = {"threads": 1, "blocks": 2,
         "grids": [{"layers": ["ln"], "shapes": [[2, 3, 16]], "passes": ["forward", "forward_backward"]},
                   {"layers": ["bn"], "shapes": [[2, 4, 3, 3]], "modes": ["eval"], "passes": ["forward"],
                    "layouts": ["channels_last"]}]}


@pytest.fixture
def sweep_file(tmp_path):
    p = tmp_path / "speed.yaml"
    p.write_text(yaml.safe_dump(SWEEP))
    return p


@pytest.fixture
def eager(monkeypatch):
    """Report plumbing without compiles: normzoo's eager engine, torch.compile left out (one test compiles)."""
    monkeypatch.setenv("NORMZOO_COMPILE", "0")
    monkeypatch.setattr(speed, "_compiled", lambda module, tag, dynamic=False: module)


def test_cli_formats(sweep_file, tmp_path, capsys, eager):
    assert cli.main(["speed", str(sweep_file)]) == 0
    table = capsys.readouterr().out
    assert max(len(line) for line in table.splitlines()) <= 120
    assert "normzoo" in table.splitlines()[0] and "cases: 3" in table

    out = tmp_path / "s.json"
    assert cli.main(["speed", str(sweep_file), "--format", "json", "--output", str(out)]) == 0
    capsys.readouterr()
    data = json.loads(out.read_text())
    env = data["environment"]
    assert {"torch", "device", "cpu", "threads", "allocator"} <= set(env) and env["threads"] == [1]
    assert [c["pass"] for c in data["cases"]] == ["forward", "forward_backward", "forward"]
    for c in data["cases"]:
        assert set(c["times_ms"]) == {"torch", "torch_compiled", "normzoo", "copy"}
        assert all(t > 0 for t in c["times_ms"].values())
        assert c["ratio"] == pytest.approx(c["times_ms"]["normzoo"] / c["times_ms"]["torch"])
        assert c["floor_x"] == pytest.approx(c["times_ms"]["normzoo"] / c["times_ms"]["copy"])
        assert {"layer", "shape", "dtype", "layout", "compile_s", "spread", "gbps"} <= set(c)
        assert len(c["blocks_ms"]["normzoo"]) == 2
    fb = data["cases"][1]
    assert fb["bytes"] == 5 * 2 * 3 * 16 * 4  # forward + backward: x, y, x, dy, dx
    assert data["cases"][2]["mode"] == "eval" and data["cases"][2]["layout"] == "channels_last"

    assert cli.main(["speed", str(sweep_file), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 3 and float(rows[0]["times_ms.normzoo"]) > 0 and rows[0]["shape"] == "2x3x16"
    assert cli.main(["speed", str(sweep_file), "--format", "markdown"]) == 0
    assert "| layer " in capsys.readouterr().out


def test_plot(sweep_file, tmp_path, capsys, eager):
    pytest.importorskip("matplotlib")
    png = tmp_path / "ratios.png"
    assert cli.main(["speed", str(sweep_file), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_a_clear_error(sweep_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(speed, "plot_available", lambda: False)
    assert cli.main(["speed", str(sweep_file), "--plot", str(tmp_path / "p.png")]) == 2
    assert "pip install 'normzoo[plot]'" in capsys.readouterr().err


def test_wrong_but_fast_contender_is_not_timed(sweep_file, capsys, eager, monkeypatch):
    """A contender whose output is wrong gets no time and no ratio, and the sweep exits 1."""
    real = normzoo.functional.layer_norm
    monkeypatch.setattr(normzoo.functional, "layer_norm", lambda *a, **k: real(*a, **k) * 1.01)
    sw = grid.load(sweep_file, "speed")
    r = speed.run_case(sw.cases[0], threads=1, blocks=1)
    assert r["times_ms"]["normzoo"] is None and r["ratio"] is None and r["floor_x"] is None
    assert r["times_ms"]["torch"] > 0 and "normzoo disagrees with torch" in r["note"]
    assert r["agreement"]["normzoo"] > 2 * sw.cases[0].tolerance * 7  # log2(2 * 3 * 16) < 7
    assert cli.main(["speed", str(sweep_file)]) == 1


def test_real_compiled_contenders_agree_before_timing():
    """normzoo compiled and torch.compile, forward: both checked against torch eager, then timed."""
    sw = grid.parse({"threads": 1, "blocks": 1,
                     "grids": [{"layers": ["gn32_silu"], "shapes": [[2, 32, 4, 4]], "passes": ["forward"]}]},
                    "speed", "t.yaml")
    r = speed.run_case(sw.cases[0], threads=1, blocks=1)
    assert r["activation"] == "silu" and r["note"] is None
    assert set(r["agreement"]) == {"torch_compiled", "normzoo"}
    assert all(e <= 2 * sw.cases[0].tolerance * 9 for e in r["agreement"].values())  # log2(2 * 32 * 4 * 4) = 9
    assert all(t > 0 for t in r["times_ms"].values())
    assert set(r["compile_s"]) == {"torch_compiled", "normzoo"}
    assert torch.get_num_threads() >= 1


def test_bad_input_exit_2(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"grids": [{"layers": ["ln"], "shapes": [[2, 3, 8]], "passes": ["backward"]}]}))
    assert cli.main(["speed", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "passes" in err and "'backward'" in err
    bad.write_text(yaml.safe_dump({"grids": [{"layers": ["ln"], "shapes": [[2, 3, 8]], "offsets": [1]}]}))
    assert cli.main(["speed", str(bad)]) == 2
    assert "'offsets'" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["speed", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_contender_right_where_torch_is_off_is_timed(sweep_file, eager, monkeypatch):
    """Disagreeing with torch is not enough to drop a contender: where torch eager is off and the contender is
    within tolerance of the float64 oracle, it is timed, with a note."""
    real = speed.torch_counterpart

    def off(zoo, ndim=None):
        t = real(zoo, ndim)
        t.eps = 0.05  # torch eager (and its compiled copy) visibly off
        return t

    monkeypatch.setattr(speed, "torch_counterpart", off)
    case = grid.load(sweep_file, "speed").cases[1]  # layer norm, forward + backward
    r = speed.run_case(case, threads=1, blocks=1)
    assert r["times_ms"]["normzoo"] > 0 and r["ratio"] is not None
    assert "torch eager is off" in r["note"] and "normzoo is within" in r["note"]
    assert r["agreement"]["normzoo"] > 2 * case.tolerance


SEQ = {"layers": ["gn32"], "shapes": [[2, 32, 4, 4], [4, 32, 4, 4], [2, 32, 6, 6], [2, 32, 4, 4]], "sequence": True}


def test_sequence_key_validation(tmp_path, capsys):
    """sequence: true/false only, speed only, and one layer must be able to take every shape."""
    sw = grid.parse({"grids": [dict(SEQ, passes=["forward"])]}, "speed", "t.yaml")
    assert len(sw.cases) == 1 and sw.cases[0].sequence == tuple(map(tuple, SEQ["shapes"]))
    assert sw.cases[0].shape == (2, 32, 4, 4)
    assert len(grid.parse({"grids": [dict(SEQ, sequence=False)]}, "speed", "t.yaml").cases) == 8
    bad = tmp_path / "bad.yaml"
    for change, words in [({"sequence": "always"}, ["sequence", "'always'", "not true or false"]),
                          ({"sequence": [True]}, ["sequence", "[True]"]),
                          ({"shapes": [[2, 32, 4, 4], [2, 64, 4, 4]]}, ["shapes", "[2, 64, 4, 4]", "features"]),
                          ({"shapes": [[2, 32, 4, 4], [2, 32, 4, 4, 4]]}, ["shapes", "[2, 32, 4, 4, 4]"]),
                          ({"shapes": [[2, 32, 4, 4], [2, 30, 4, 4]]}, ["[2, 30, 4, 4]", "divisible"])]:
        bad.write_text(yaml.safe_dump({"grids": [dict(SEQ, **change)]}))
        assert cli.main(["speed", str(bad)]) == 2, change
        err = capsys.readouterr().err
        assert "bad.yaml" in err and all(w in err for w in words), (change, err)
    bad.write_text(yaml.safe_dump({"grids": [SEQ]}))
    assert cli.main(["equivalence", str(bad)]) == 2
    assert "'sequence'" in capsys.readouterr().err


def test_sequence_case_checks_every_shape(eager, monkeypatch):
    """A wrong output on any one shape of the sequence (here the third) keeps the contender from being timed."""
    real = normzoo.functional.group_norm

    def wrong_on_6x6(x, *a, **k):
        y = real(x, *a, **k)
        return y * 1.01 if x.shape[-1] == 6 else y

    monkeypatch.setattr(normzoo.functional, "group_norm", wrong_on_6x6)
    case = grid.parse({"grids": [dict(SEQ, passes=["forward"])]}, "speed", "t.yaml").cases[0]
    r = speed.run_case(case, threads=1, blocks=1)
    assert r["times_ms"]["normzoo"] is None and "normzoo disagrees" in r["note"]


def test_sequence_case_compiled(tmp_path, capsys):
    """The real thing on tiny shapes: one row per pass, compiles counted per contender, no eager fallback."""
    f = tmp_path / "seq.yaml"
    f.write_text(yaml.safe_dump({"threads": 1, "blocks": 1, "grids": [SEQ]}))
    out = tmp_path / "s.json"
    assert cli.main(["speed", str(f), "--format", "json", "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [c["pass"] for c in data["cases"]] == ["forward", "forward_backward"]
    for c in data["cases"]:
        assert c["shape"] == "seq of 4" and c["shapes"] == SEQ["shapes"]
        assert c["bytes"] == sum(4 * (2 if c["pass"] == "forward" else 5) * 32 * n for n in (2 * 16, 4 * 16, 2 * 36,
                                                                                              2 * 16))
        assert all(t > 0 for t in c["times_ms"].values()) and c["note"].startswith("torch.compile (dynamic=None)")
        assert set(c["agreement"]) == {"torch_compiled", "normzoo"}
        zc, tc = c["compiles"]["normzoo"], c["compiles"]["torch_compiled"]
        # 2 spatial sizes (batch sizes share a kernel): a forward kernel each in the forward case, then a backward
        # kernel each in the forward_backward case (whose forwards are the same kernels)
        assert zc["first_pass"] == 2
        assert zc["warm_pass"] == 0 and zc["evictions"] == 0
        assert zc["compile_seconds"] > 0 and c["compile_s"]["normzoo"] >= zc["compile_seconds"]
        assert 1 <= tc["first_pass"] <= 3 and tc["warm_pass"] == 0
        assert c["no_eager_fallback"] is True
    for fmt, want in [("table", " seq of 4 "), ("markdown", "| seq of 4"), ("csv", ",seq of 4,")]:
        text = rp.render(data, fmt, speed.COLUMNS)
        assert want in text, fmt
    rows = list(csv.DictReader(io.StringIO(text)))
    assert json.loads(rows[0]["shapes"]) == SEQ["shapes"] and rows[0]["no_eager_fallback"] == "True"


def test_rms_norm_and_layer_norm2d_cases(eager):
    """The machinery takes RMSNorm (torch = torch.nn.RMSNorm) and LayerNorm2d (torch = permute + F.layer_norm +
    permute) in both layouts: every contender agrees with torch before it is timed. The default sweep holds the
    LLM and ConvNeXt shapes."""
    sw = grid.parse({"threads": 1, "blocks": 1, "grids": [
        {"layers": ["rms"], "shapes": [[2, 4, 64]], "dtypes": ["float32", "bfloat16"]},
        {"layers": ["ln2d"], "shapes": [[2, 16, 4, 4]], "layouts": ["contiguous", "channels_last"]}]},
        "speed", "t.yaml")
    assert len(sw.cases) == 8
    for case in sw.cases:
        r = speed.run_case(case, threads=1, blocks=1)
        assert r["note"] is None and all(t > 0 for t in r["times_ms"].values()), r
        assert r["agreement"]["normzoo"] <= 2 * case.tolerance * 10, r
    default = {(c.layer, c.shape, c.dtype, c.layout, c.pass_) for c in grid.load(None, "speed").cases}
    for p in speed.PASS_SHORT:
        assert {("rms", (4, 512, 4096), dt, "contiguous", p) for dt in ("float32", "bfloat16")} <= default
        assert {("ln2d", (8, 96, 56, 56), "float32", lay, p) for lay in ("contiguous", "channels_last")} <= default
