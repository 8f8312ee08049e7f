"""Sweep files: expansion into cases, and validation that names the file, the key and the bad value."""

import pytest
import yaml

from normzoo.sweeps import grid


def parse(grids, kind="equivalence", **top):
    return grid.parse({"grids": grids, **top}, kind, "sweep.yaml")


def test_expansion_multiplies_out_and_notes_skips():
    sw = parse([{
        "layers": ["gn8"], "shapes": [[2, 8, 4, 4], [2, 8, 5]], "dtypes": ["float32", "bfloat16"],
        "layouts": ["contiguous", "channels_last"], "offsets": [0, "1e3"], "modes": ["train", "eval"],
        "compiled": [False],
    }])
    # 4-D: 2 dtypes x 2 layouts x 2 offsets; 3-D: no channels_last form; eval: GroupNorm has no running stats
    assert len(sw.cases) == 8 + 4
    assert {c.offset for c in sw.cases} == {0.0, 1000.0}  # YAML 1.1 reads 1e3 as a string
    assert all(c.mode == "train" and c.family == "group_norm" and not c.compiled for c in sw.cases)
    assert any("channels_last skipped for 3-D" in n for n in sw.notes)
    assert any("eval skipped for group_norm" in n for n in sw.notes)


def test_batchnorm_modes_generic_type_and_defaults():
    sw = parse([{"layers": ["bn"], "shapes": [[2, 4, 3, 3], [2, 4, 2, 3, 3]], "modes": ["train", "eval"]}])
    assert [(c.spec_dict["type"], c.mode) for c in sw.cases] == [
        ("batch_norm2d", "train"), ("batch_norm2d", "eval"), ("batch_norm3d", "train"), ("batch_norm3d", "eval")]
    c = sw.cases[0]
    assert (c.dtype, c.layout, c.offset, c.compiled) == ("float32", "contiguous", 0.0, True)
    assert c.tolerance == pytest.approx(16 * 2 ** -23)


def test_layer_norm_features_dict_spec_label_and_tolerances():
    sw = parse([{"layers": [{"name": "my_gn", "type": "group_norm", "num_groups": 2}, "ln"],
                 "shapes": [[3, 4, 6]], "tolerances": {"float32": 1e-4}}])
    assert [c.layer for c in sw.cases] == ["my_gn", "ln"]
    assert [c.num_features for c in sw.cases] == [4, 6]
    assert all(c.tolerance == 1e-4 for c in sw.cases)
    sw = parse([{"layers": ["rms", "ln2d"], "shapes": [[3, 4, 6]], "layouts": ["contiguous", "channels_last"]}])
    assert [(c.layer, c.family, c.num_features) for c in sw.cases] == [("rms", "rms_norm", 6),
                                                                      ("ln2d", "layer_norm2d", 4)]
    assert any("channels_last skipped for 3-D" in n for n in sw.notes)


def test_speed_keys_passes_threads():
    sw = parse([{"layers": ["ln"], "shapes": [[2, 3, 8]], "passes": ["forward"], "dtypes": ["float32", "bfloat16"]}],
               kind="speed", threads=[1, 2], blocks=3)
    assert [c.pass_ for c in sw.cases] == ["forward", "forward"]
    assert sw.threads == [1, 2] and sw.blocks == 3
    sw = parse([{"layers": ["ln"], "shapes": [[2, 3, 8]]}], kind="speed")
    assert [c.pass_ for c in sw.cases] == ["forward", "forward_backward"]


@pytest.mark.parametrize("kind", ["equivalence", "speed"])
def test_embedded_defaults_load(kind):
    sw = grid.load(None, kind)
    assert sw.cases and sw.source.endswith(f"{kind}.yaml")
    assert {c.family for c in sw.cases} == {"group_norm", "layer_norm", "instance_norm", "batch_norm", "rms_norm",
                                            "layer_norm2d"}
    # RMSNorm normalizes the last dim, LayerNorm2d the channels at dim 1
    assert all(c.num_features == c.shape[-1 if c.family == "rms_norm" else 1] for c in sw.cases
               if c.family in ("rms_norm", "layer_norm2d"))


BAD = [
    # (grid or top-level change, words the message must hold)
    ({"dtypes": ["float8"]}, ["grids[0].dtypes", "'float8'", "bfloat16"]),
    ({"layouts": ["nhwc"]}, ["grids[0].layouts", "'nhwc'", "channels_last"]),
    ({"modes": ["training"]}, ["grids[0].modes", "'training'"]),
    ({"layers": ["gn33"]}, ["grids[0].layers", "'gn33'", "did you mean"]),
    ({"layers": [{"type": "group_norm", "num_group": 4}]}, ["grids[0].layers", "num_group"]),
    ({"shapes": [2, 8, 4, 4]}, ["grids[0].shapes", "one shape"]),
    ({"shapes": [[2, 0, 4]]}, ["grids[0].shapes", "[2, 0, 4]"]),
    ({"shapes": [[2, 6, 4, 4]]}, ["grids[0]", "'gn8'", "[2, 6, 4, 4]", "divisible"]),
    ({"offsets": ["big"]}, ["grids[0].offsets", "'big'"]),
    ({"compiled": ["yes"]}, ["grids[0].compiled", "'yes'"]),
    ({"tolerances": {"float8": 1e-3}}, ["grids[0].tolerances", "'float8'"]),
    ({"tolerances": {"float32": -1}}, ["grids[0].tolerances.float32", "-1"]),
    ({"passes": ["forward"]}, ["grids[0]", "'passes'", "equivalence"]),
    ({"colour": "red"}, ["grids[0]", "'colour'"]),
]


@pytest.mark.parametrize("change,words", BAD, ids=[str(list(c)[0]) + str(i) for i, (c, _) in enumerate(BAD)])
def test_bad_grid_named(change, words):
    g = {"layers": ["gn8"], "shapes": [[2, 8, 4, 4]], **change}
    with pytest.raises(grid.SweepError) as err:
        parse([g])
    msg = str(err.value)
    assert msg.startswith("sweep.yaml: ")
    for w in words:
        assert w in msg, (w, msg)


def test_bad_top_level_and_files(tmp_path):
    with pytest.raises(grid.SweepError, match=r"unknown top-level key 'threads' for a equivalence sweep"):
        parse([{"layers": ["gn8"], "shapes": [[2, 8, 4, 4]]}], threads=2)
    with pytest.raises(grid.SweepError, match=r"threads: 0 is not a positive integer"):
        parse([{"layers": ["gn8"], "shapes": [[2, 8, 4, 4]]}], kind="speed", threads=0)
    with pytest.raises(grid.SweepError, match=r"'grids' must be a non-empty list"):
        grid.parse({"grids": []}, "equivalence", "x.yaml")
    with pytest.raises(grid.SweepError, match=r"missing key 'shapes'"):
        parse([{"layers": ["gn8"]}])
    bad = tmp_path / "bad.yaml"
    bad.write_text("grids:\n  - layers: [gn8\n")
    with pytest.raises(grid.SweepError, match=r"bad.yaml: line \d+: not valid YAML"):
        grid.load(bad, "equivalence")
    with pytest.raises(grid.SweepError, match=r"missing.yaml: cannot read"):
        grid.load(tmp_path / "missing.yaml", "equivalence")
    only_skips = tmp_path / "skips.yaml"
    only_skips.write_text(yaml.safe_dump({"grids": [{"layers": ["ln"], "shapes": [[2, 3, 4]],
                                                      "layouts": ["channels_last"]}]}))
    with pytest.raises(grid.SweepError, match="no runnable case"):
        grid.load(only_skips, "equivalence")


def test_instance_norm_needs_a_batched_shape():
    with pytest.raises(grid.SweepError, match=r"instance_norm1d.*cannot take the 2-D shape"):
        parse([{"layers": [{"type": "instance_norm1d"}], "shapes": [[4, 8]]}])


def test_sweep_file_exponents_are_floats_and_bad_values_named(tmp_path):
    f = tmp_path / "sweep.yaml"
    f.write_text("grids:\n  - layers: [{type: layer_norm, eps: 1e-5}, {name: bn3, type: batch_norm, eps: 1E-3}]\n"
                 "    shapes: [[2, 8, 4]]\n    offsets: [0, 1e3]\n    tolerances: {float32: 2e-6}\n"
                 "    compiled: [false]\n")
    cases = grid.load(f, "equivalence").cases
    eps = {c.layer: c.spec_dict["eps"] for c in cases}
    assert eps == {"layer_norm(eps=1e-05)": 1e-5, "bn3": 1e-3} and all(type(e) is float for e in eps.values())
    assert {c.offset for c in cases} == {0.0, 1e3} and {c.tolerance for c in cases} == {2e-6}
    f.write_text("grids:\n  - layers: [{type: layer_norm, eps: abc}]\n    shapes: [[2, 8]]\n")
    with pytest.raises(grid.SweepError) as err:
        grid.load(f, "equivalence")
    msg = str(err.value)
    assert msg.startswith(f"{f}: grids[0].layers: bad layer") and "eps" in msg and "'abc'" in msg, msg
