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


def test_raises_where_it_cannot_tell_the_nests_apart():
    """A kernel whose loops are serial (no `omp for`), or a wrapper without the inputs' shapes: an error, not a 0."""
    kernel = ("cpp_fused_add_0 = async_compile.cpp_pybinding(['const float*', 'float*'], r'''\n"
              'extern "C" void kernel(const float* in_ptr0, float* out_ptr0)\n{\n'
              "    for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(4096L); x0+=static_cast<int64_t>(1L))\n"
              "    { out_ptr0[x0] = in_ptr0[x0]; }\n}\n''')\n")
    call = "\n        cpp_fused_add_0(arg0_1, buf0)\n"
    shape = "        assert_size_stride(arg0_1, (64, 64), (64, 1))\n"
    with pytest.raises(RuntimeError, match="outside any parallel loop"):
        bp.full_size_reads([kernel + shape + call], (64, 64))
    with pytest.raises(RuntimeError, match="no input of shape"):
        bp.full_size_reads([kernel + call], (64, 64))
