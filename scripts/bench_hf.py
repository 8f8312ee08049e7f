#!/usr/bin/env python
"""A Hugging Face Llama's CPU forward with its own RMSNorms (LlamaRMSNorm) against the same model after
normzoo.convert(model, "rms"), in float32 and bfloat16. Nothing is downloaded: the models come from LlamaConfig.

Two sizes: `tiny` (hidden 64, 2 layers, 4 heads, vocab 128: the size of the tests) and `small` (hidden 512,
4 layers, 8 heads, vocab 1024). Input: `--batch` x `--seq` token ids. Contenders per (size, dtype):
  hf             the model as transformers builds it
  normzoo        convert(model, "rms"): compiled kernels (the default)
  normzoo eager  convert(model, "rms", compile=False)
Every contender's logits must agree with hf's (float32: 1e-3 of the largest logit; bfloat16: 5e-2) before timing.
Then `--blocks` blocks, each timing `--calls` forwards under torch.inference_mode per contender, the contenders
interleaved and rotated (none always first). Reported per forward, medians over the blocks: wall ms and process
CPU ms (time.process_time: on a shared machine the CPU time of this process is less inflated by neighbours than
the wall time; with --threads 1 it is the compute time), the CPU time's interquartile range over its median
(noise), and the ratios to hf.
The CPU model, torch and transformers versions and the thread count are printed first.

    pip install -r requirements-integration.txt -e .      # transformers (README, "Norms in real models")
    python scripts/bench_hf.py                             # about 2 minutes on 2 cores
    python scripts/bench_hf.py --sizes tiny --dtypes float32 --blocks 5
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import subprocess
import sys
import time

# timed forwards measure compiled kernels, each compiled before its first call (normzoo.policy)
os.environ.setdefault("NORMZOO_COMPILE", "sync")

import torch  # noqa: E402

import normzoo

SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128),
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=1024),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
        flags = next((l for l in out.splitlines() if l.startswith("Flags")), "")
        return name + (" (AVX-512)" if "avx512f" in flags else " (AVX2)" if "avx2" in flags else "")
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def build(size: str, dtype: torch.dtype):
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES[size])).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # not all ones: the norms' weights matter
    return model.to(dtype)


def time_block(model, ids, calls: int) -> tuple[float, float]:
    """(wall ms, process CPU ms) per forward."""
    with torch.inference_mode():
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(calls):
            model(ids)
        return (time.perf_counter() - wall) / calls * 1e3, (time.process_time() - cpu) / calls * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--blocks", type=int, default=9)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    print(f"CPU: {cpu_model()}; torch {torch.__version__}; transformers {transformers.__version__}; "
          f"threads {torch.get_num_threads()}; input {args.batch} x {args.seq} tokens; "
          f"{args.blocks} blocks x {args.calls} forwards, interleaved; medians; load average "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    rows, failed = [], False
    for size in args.sizes:
        for dname in args.dtypes:
            hf = build(size, DTYPES[dname])
            contenders = {"hf": hf,
                          "normzoo": normzoo.convert(copy.deepcopy(hf), "rms"),
                          "normzoo eager": normzoo.convert(copy.deepcopy(hf), "rms", compile=False)}
            ids = torch.randint(0, SIZES[size]["vocab_size"], (args.batch, args.seq),
                                generator=torch.Generator().manual_seed(0))
            with torch.inference_mode():
                ref = hf(ids).logits.float()
                for name, model in contenders.items():  # also the warm-up: kernels compile here
                    err = (model(ids).logits.float() - ref).abs().max().item()
                    if err > TOLERANCE[dname] * ref.abs().max().item():
                        print(f"{size} {dname} {name}: logits differ from hf's by {err:.3g}", file=sys.stderr)
                        failed = True
                    model(ids)
            walls, cpus = {name: [] for name in contenders}, {name: [] for name in contenders}
            order = list(contenders)
            for block in range(args.blocks):
                for name in order[block % len(order):] + order[:block % len(order)]:
                    wall, cpu = time_block(contenders[name], ids, args.calls)
                    walls[name].append(wall)
                    cpus[name].append(cpu)
            base_wall, base_cpu = statistics.median(walls["hf"]), statistics.median(cpus["hf"])
            for name in contenders:
                wall, cpu = statistics.median(walls[name]), statistics.median(cpus[name])
                q = statistics.quantiles(cpus[name], n=4) if args.blocks > 1 else [cpu, cpu, cpu]
                rows.append((size, dname, name, f"{wall:.2f}", f"{wall / base_wall:.2f}", f"{cpu:.2f}",
                             f"{(q[2] - q[0]) / cpu:.2f}", f"{cpu / base_cpu:.2f}"))
    print()
    print("| model | dtype | norms | wall ms | wall / hf | CPU ms | CPU iqr / median | CPU / hf |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
