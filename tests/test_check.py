"""normzoo check: a user's layer against the oracle, the diagnosis of the usual mistakes, the CLI and sweep entries."""

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normzoo
from normzoo import cli
from normzoo.sweeps import equivalence as eq
from normzoo.sweeps import grid, oracle

ck = importlib.import_module("normzoo.check")  # normzoo.check is the function
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))
import norm_mistakes as mistakes  # noqa: E402
import origin_groupnorm as origin  # noqa: E402


def text(report) -> str:
    return "\n".join(report.diagnosis)


def test_origin_diagnosis_names_unbiased_variance_and_state():
    r = normzoo.check(origin.OriginalGroupNorm, "gn1", args=(1, 3), kwargs={"affine": False})
    assert not r.ok and r.verdict == "FAIL"
    t = text(r)
    assert "unbiased variance" in t and "divide by n-1" in t, t
    assert "state carried between calls" in t and "running_mean, running_var changed" in t, t
    assert all(row["verdict"] == "FAIL" for row in r.rows)


def test_fixed_passes_and_is_within_1e6_of_torch():
    x = torch.randn(32, 3, 28, 28)
    fixed, theirs = origin.FixedGroupNorm(1, 3, affine=False), nn.GroupNorm(1, 3, affine=False)
    assert (fixed(x) - theirs(x)).abs().max().item() <= 1e-6
    r = normzoo.check(origin.FixedGroupNorm, "gn1", args=(1, 3), kwargs={"affine": False}, shape=(32, 3, 28, 28))
    assert r.ok, r
    assert text(r).startswith("PASS: matches GroupNorm(1, 3)") and "torch.nn" in text(r)
    f32 = [row for row in r.rows if row["dtype"] == "float32" and row["mean"] == 0]
    assert max(row["out"] for row in f32) <= 1e-6
    assert {(row["batch"], row["mode"]) for row in r.rows} == {(1, "train"), (1, "eval"), (32, "train"), (32, "eval")}


@pytest.mark.parametrize("cls,like,args,words", [
    (mistakes.EpsOutsideSqrt, "gn8", (8, 16), ["eps outside the sqrt: matches GroupNorm(8, 16)", "sqrt(var + eps)"]),
    (mistakes.PerChannelStats, "gn8", (8, 16), ["wrong axes: matches GroupNorm(8, 16) with statistics per channel",
                                                "per group of 2 channels"]),
    (mistakes.PerElementAffine, "gn1", (16, (8, 8)), ["per-element affine", "LayerNorm([C, H, W])", "(16,)"]),
])
def test_standins_are_diagnosed(cls, like, args, words):
    r = normzoo.check(cls, like, args=args)
    assert not r.ok
    t = text(r)
    for w in words:
        assert w in t, (w, t)
    assert "not explained" not in t and "state carried" not in t, t


def test_one_pass_variance_cancellation_float32_mean_1e3():
    r = normzoo.check(mistakes.OnePassVariance, "gn8", args=(8, 16))
    t = text(r)
    assert "E[x^2] - E[x]^2 cancellation" in t and "not explained" not in t, t
    rows = {(row["dtype"], row["mean"]): row for row in r.rows if row["mode"] == "train" and row["batch"] == 4}
    assert rows["float32", 0.0]["verdict"] == "PASS" and rows["float32", 1e3]["verdict"] == "FAIL"
    assert rows["float32", 1e3]["out"] > 1e3 * rows["float32", 0.0]["out"]  # grows with the mean


@pytest.mark.parametrize("layer,like,kw", [
    (nn.GroupNorm, "gn8", {"args": (8, 16)}),
    (nn.LayerNorm(6), "ln", {}),
    (nn.BatchNorm2d(4), "bn", {}),
    (nn.InstanceNorm2d(4, affine=True), "instance_norm", {}),
    (lambda x: F.group_norm(x, 4), "gn1", {"shape": (3, 8, 5, 5)}),  # gn1 but 4 groups: a function, no attributes
])
def test_torch_layers(layer, like, kw):
    r = normzoo.check(layer, like, **kw)
    if like == "gn1":
        assert not r.ok and "num_groups=4" in text(r), text(r)
    else:
        assert r.ok, r
        for row in r.rows:  # the layer is torch's own: its errors are torch's
            assert row["out"] == pytest.approx(row["torch_out"], rel=1e-6, abs=1e-30)


def test_affine_bound_by_shape_and_identity_when_absent():
    class Unnamed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.ones(16))
            self.c = nn.Parameter(torch.zeros(16))

        def forward(self, x):
            return F.group_norm(x, 8, self.a, self.c)

    r = normzoo.check(Unnamed(), "gn8", shape=(2, 16, 3, 3), name="unnamed")
    assert r.ok, r
    assert any("a [16] -> weight (by shape)" in n and "c [16] -> bias (by shape)" in n for n in r.notes), r.notes
    swapped = type("Swapped", (Unnamed,), {"forward": lambda self, x: F.group_norm(x, 8, self.c, self.a)})
    assert not normzoo.check(swapped(), "gn8", shape=(2, 16, 3, 3)).ok  # the affine values are non-trivial
    r = normzoo.check(lambda x: F.group_norm(x, 8), "gn8", shape=(2, 16, 3, 3))
    assert r.ok, r  # no affine on the layer: compared with the identity affine


def test_low_precision_and_other_eps():
    r = normzoo.check(lambda x: F.group_norm(x.float(), 8).to(x.dtype), "gn8", shape=(2, 16, 4, 4))
    assert "low-precision arithmetic: on float64 inputs" in text(r) and "float32's rounding" in text(r), text(r)
    assert all(row["verdict"] == "PASS" for row in r.rows if row["dtype"] == "float32")
    r = normzoo.check(nn.GroupNorm(8, 16, eps=1e-3), "gn8")
    assert "another eps: matches GroupNorm(8, 16) with eps=0.001" in text(r), text(r)


def test_unexplained_difference_says_so_with_numbers():
    r = normzoo.check(lambda x: F.group_norm(x, 8) * 1.01, "gn8", shape=(2, 16, 4, 4))
    t = text(r)
    assert "not explained by any known variant" in t and "tolerance" in t, t


@pytest.mark.parametrize("family,spec,shape", [
    ("group_norm", "gn8", (3, 16, 2, 3)), ("layer_norm", "ln", (2, 3, 5)), ("instance_norm", "instance_norm",
                                                                           (2, 4, 5)),
    ("batch_norm", "bn", (3, 4, 2, 2)),
])
@pytest.mark.parametrize("training", [True, False])
def test_variant_without_mistakes_is_the_oracle(family, spec, shape, training):
    s = grid._fix_type(normzoo.registry.resolve_spec(spec), len(shape))
    zoo = ck._build_like(s, shape[-1] if family == "layer_norm" else shape[1], spec)
    zoo.train(training)
    geo = ck._geometry(zoo, shape, family)
    x = torch.randn(shape, dtype=torch.float64) * 2 + 3
    running = (zoo.running_mean, zoo.running_var) if family == "batch_norm" else None
    want = oracle.Reference(zoo).forward(x, training)
    got = ck.variant_forward(geo, ck.Variant(), x, zoo.weight.detach(), zoo.bias.detach(), training, running)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if family == "group_norm":  # and a mistake is a different function
        bad = ck.variant_forward(geo, ck.Variant(unbiased=True), x, zoo.weight.detach(), zoo.bias.detach(), True)
        assert (bad - want).abs().max() > 1e-3


def test_parse_init_and_shape():
    assert ck.parse_init("1, 3, affine=False") == ((1, 3), {"affine": False})
    assert ck.parse_init("16, (8, 8)") == ((16, (8, 8)), {})
    assert ck.parse_init(None) == ((), {})
    for bad in ("1, 3, affine=False)", "os.getcwd()", "**d"):
        with pytest.raises(ck.CheckError, match="--init"):
            ck.parse_init(bad)
    assert ck.parse_shape("4,3,8,8") == (4, 3, 8, 8)
    with pytest.raises(ck.CheckError, match="--shape"):
        ck.parse_shape("4")


def test_file_is_loaded_once(tmp_path):
    f = tmp_path / "counting.py"
    f.write_text("import builtins\nbuiltins.NZ_LOADS = getattr(builtins, 'NZ_LOADS', 0) + 1\n"
                 "from torch import nn\nclass Norm(nn.GroupNorm):\n    pass\n")
    import builtins

    a = ck.load_target(f"{f}:Norm")
    b = ck.load_target(f"{f}:Norm")
    assert a is b and builtins.NZ_LOADS == 1


def run_cli(*argv, capsys):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_exit_statuses_and_formats(tmp_path, capsys):
    target = str(EXAMPLES / "origin_groupnorm.py")
    rc, out, _ = run_cli("check", f"{target}:FixedGroupNorm", "--like", "gn1", "--init", "1, 3, affine=False",
                         capsys=capsys)
    assert rc == 0 and "PASS: matches GroupNorm(1, 3)" in out and "out\nlayer" not in out
    rc, out, _ = run_cli("check", f"{target}:OriginalGroupNorm", "--like", "gn1", "--init", "1, 3", "--format",
                         "json", capsys=capsys)
    data = json.loads(out)
    assert rc == 1 and data["summary"]["verdict"] == "FAIL" and len(data["cases"]) == 24
    assert any("unbiased variance" in d for d in data["diagnosis"])
    path = tmp_path / "r.md"
    rc, out, _ = run_cli("check", f"{target}:FixedGroupNorm", "--like", "gn1", "--init", "1, 3", "--format",
                         "markdown", "--output", str(path), capsys=capsys)
    assert rc == 0 and "| dtype" in path.read_text() and str(path) in out


@pytest.mark.parametrize("target,init,shape,words", [
    ("missing.py:X", None, None, ["missing.py: no such file"]),
    ("EX/origin_groupnorm.py:Fixed", None, None, ["no class 'Fixed'", "FixedGroupNorm"]),
    ("EX/origin_groupnorm.py:FixedGroupNorm", "1, 3, afine=True", None, ["FixedGroupNorm(1, 3, afine=True) raised",
                                                                        "afine"]),
    ("torch.nn:Flatten", None, "2,4,5,5", ["Flatten changes the shape", "[2, 4, 5, 5]", "[2, 100]"]),
    ("no_such_pkg.mod:X", None, None, ["no module named 'no_such_pkg'"]),
    ("EX/origin_groupnorm.py", None, None, ["path/to/file.py:ClassName"]),
])
def test_cli_bad_input_exit_2(target, init, shape, words, capsys):
    argv = ["check", target.replace("EX", str(EXAMPLES)), "--like", "gn1"]
    argv += ["--init", init] if init else []
    argv += ["--shape", shape] if shape else []
    rc, _, err = run_cli(*argv, capsys=capsys)
    assert rc == 2
    for w in words:
        assert w in err, (w, err)


def user_grid(tmp_path, **layer):
    (tmp_path / "my_norms.py").write_text((EXAMPLES / "origin_groupnorm.py").read_text())
    entry = {"name": "mine", "class": "my_norms.py:FixedGroupNorm", "init": {"num_groups": 1, "num_channels": 3},
             "like": "gn1", **layer}
    entry = {k: v for k, v in entry.items() if v is not None}
    src = tmp_path / "sweep.yaml"
    src.write_text("")
    return grid.parse({"grids": [{"layers": ["gn1", entry], "shapes": [[2, 3, 4, 4]], "offsets": [0, 1e3],
                                  "compiled": [False, True]}]}, "equivalence", str(src))


def test_sweep_user_layer_runs_beside_the_zoo(tmp_path):
    sw = user_grid(tmp_path)
    mine = [c for c in sw.cases if c.layer == "mine"]
    assert len(mine) == 2 and all(c.user is not None and not c.compiled for c in mine)  # compiled does not multiply
    assert all(eq.run_case(c)["verdict"] == "PASS" for c in mine)
    sw = user_grid(tmp_path, **{"class": "my_norms.py:OriginalGroupNorm", "init": [1, 3]})
    rows = [eq.run_case(c) for c in sw.cases if c.layer == "mine"]
    assert [r["verdict"] for r in rows] == ["FAIL", "FAIL"] and rows[0]["err_zoo"] > 1e-3


@pytest.mark.parametrize("change,words", [
    ({"like": None}, ["layer 'mine'", "missing key 'like'"]),
    ({"like": "gn9"}, ["layer 'mine'", "'gn9'"]),
    ({"colour": 1}, ["layer 'mine'", "unknown key 'colour'"]),
    ({"class": "nope.py:X"}, ["layer 'mine'", "nope.py: no such file"]),
    ({"class": "my_norms.py:Nope"}, ["layer 'mine'", "no class 'Nope'"]),
    ({"init": {"num_group": 1, "num_channels": 3}}, ["layer 'mine'", "raised TypeError", "num_group"]),
    ({"init": {"num_groups": 1, "num_channels": 4}}, ["grids[0]", "mine", "raised", "[2, 3, 4, 4]"]),
    ({"init": "1, 3"}, ["layer 'mine'", "init"]),
])
def test_sweep_user_layer_errors(tmp_path, change, words):
    with pytest.raises(grid.SweepError) as err:
        user_grid(tmp_path, **change)
    for w in words:
        assert w in str(err.value), (w, str(err.value))
