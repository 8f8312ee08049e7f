"""scripts/bench_passes.py: its count of full-size reads per loop nest, on small graphs whose loops are known."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_passes.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_passes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bp = _load()


def test_counts_one_nest_reading_both_inputs_and_leaves_out_a_few_elements_a_row():
    x, dy = torch.randn(256, 512), torch.randn(256, 512)
    codes = bp.generated_code(lambda x, dy: (x + dy) * 2, x, dy)
    assert bp.full_size_reads(codes, (256, 512)) == [2]
    # the first 16 elements of each row (what a shift reads) are not a pass over x
    codes = bp.generated_code(lambda x: x[:, :16].sum(-1) * 3, x)
    assert bp.full_size_reads(codes, (256, 512)) == []


def test_counts_two_nests_where_a_row_sum_is_needed_across_rows():
    x = torch.randn(256, 512)
    # each row divided by the sum of the whole column: a column sum over every row, then the elementwise pass
    codes = bp.generated_code(lambda x: x / x.sum(0, keepdim=True), x)
    reads = bp.full_size_reads(codes, (256, 512))
    assert len(reads) == 2 and all(n == 1 for n in reads), codes


def test_rejects_unknown_cases():
    with pytest.raises(SystemExit):
        bp.main(["--cases", "ln768,nope"])
