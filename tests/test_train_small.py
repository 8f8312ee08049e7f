"""scripts/train_small.py: the small-batch study, run short."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import normzoo

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "train_small.py"


def _load():
    spec = importlib.util.spec_from_file_location("train_small", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ts = _load()


def test_config_picks_the_norm_by_preset_name():
    cfg = ts.load_config(None)
    for norm, cls in (("bn", normzoo.BatchNorm2d), ("gn8", normzoo.GroupNorm), ("gn1", normzoo.GroupNorm)):
        model = ts.build_model(cfg, norm)
        norms = [m for m in model.modules() if isinstance(m, (normzoo.BatchNorm2d, normzoo.GroupNorm))]
        assert len(norms) == len(cfg["model"]["widths"]) + 1 and all(type(m) is cls for m in norms)
        assert all(m.compile is False for m in norms)  # the config's train.compile
    assert ts.build_model(cfg, "gn8").features[1].num_groups == 8


def test_bad_preset_in_config_is_named(tmp_path):
    bad = tmp_path / "net.yaml"
    bad.write_text(ts.DEFAULT_CONFIG.read_text().replace("norms: [bn, gn8, in, gn1]", "norms: [bn, gn9x]"))
    with pytest.raises(SystemExit, match=r"net.yaml: unknown norm preset 'gn9x'"):
        ts.load_config(bad)


def test_data_is_deterministic_and_needs_spatial_structure():
    cfg = ts.load_config(None)["data"]
    x1, y1 = ts.make_gratings(64, cfg, 5)
    x2, y2 = ts.make_gratings(64, cfg, 5)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == (64, 1, cfg["image_size"], cfg["image_size"])
    assert set(y1.tolist()) <= set(range(cfg["classes"])) and len(set(y1.tolist())) > 1
    # per-image mean and std carry (almost) no label information: the orientation is spatial
    x, y = ts.make_gratings(2048, cfg, 1)
    means = x.mean(dim=(1, 2, 3))
    per_class = torch.stack([means[y == c].mean() for c in range(cfg["classes"])])
    assert per_class.std() < 0.1 * means.std()


def test_quick_study_runs_and_prints_the_table(tmp_path):
    """The script end to end (--quick, one worker): a table with every norm and batch size, accuracies in range."""
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--workers", "1", "--norms", "bn", "gn8", "--batch-sizes", "8", "2",
         "--epochs", "1"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| norm"))
    assert [c.strip() for c in header.strip("|").split("|")][1:] == ["8", "2"]
    for norm in ("bn", "gn8"):
        row = next(line for line in lines if line.startswith(f"| {norm} "))
        accs = [float(c) for c in row.strip("|").split("|")[1:]]
        assert len(accs) == 2 and all(0.0 <= a <= 100.0 and math.isfinite(a) for a in accs), row
    assert "runs in" in out.stdout


def test_train_one_learns_something():
    """A few hundred steps beat chance clearly: the data and the training loop work."""
    cfg = ts.load_config(None, quick=True)
    cfg["data"].update(train_size=512, val_size=256)
    cfg["train"]["epochs"] = 2
    result = ts.train_one(cfg, "bn", 8, ts._data(cfg))
    chance = 100.0 / cfg["data"]["classes"]
    assert result["val_acc"] > 2 * chance, result


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    results = [{"norm": "bn", "batch_size": 2, "val_acc": 50.0}]
    with pytest.raises(SystemExit, match="pip install"):
        ts.plot(results, ["bn"], [2], "x.png")


@pytest.mark.slow
def test_full_study_shows_batchnorm_degrading_at_small_batches():
    """The whole study (minutes): BatchNorm loses accuracy from batch 32 to batch 2, GroupNorm(8) does not lose
    as much. Run with `pytest -m slow`."""
    cfg = ts.load_config(None)
    cfg["study"].update(norms=["bn", "gn8"], batch_sizes=[32, 2])
    acc = {(r["norm"], r["batch_size"]): r["val_acc"] for r in ts.run_study(cfg, workers=2)}
    bn_drop = acc[("bn", 32)] - acc[("bn", 2)]
    gn_drop = acc[("gn8", 32)] - acc[("gn8", 2)]
    assert bn_drop > gn_drop, acc
