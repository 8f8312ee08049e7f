#!/usr/bin/env python
"""Whole-model step time: torch.nn norm layers against normzoo's, as a user feels it.

Three small models written here (nothing is downloaded): a ResNet-18-like net (BasicBlock, [2, 2, 2, 2], widths
64..512), a ResNet-50-like net (Bottleneck, [3, 4, 6, 3]) and a ViT block stack (pre-norm LayerNorm, attention,
MLP; 384 wide, 6 heads, 197 tokens, 4 blocks). The ResNets take BatchNorm2d or GroupNorm(32), the ViT LayerNorm.

Per model, norm, mode (train: forward + cross-entropy + backward + SGD step, in train mode; eval: forward under
torch.no_grad in eval mode) and compile setting (eager, or the whole model under torch.compile(model)), two
contenders: the model with torch.nn layers, and the same model built with normzoo layers (norm_layer=...) holding
the torch.nn model's state_dict, so that both compute the same function. Before any timing:
  1. an eval forward of both (normzoo's engine run eagerly here) must agree within rtol = atol = 1e-4;
  2. each contender's first step is timed apart (`first s`: normzoo's kernel compiles, or the whole-model
     compile, happen there), and its output (the logits) must agree with the torch.nn contender's first output
     within the same tolerance.
A case that disagrees is reported with no times and the script exits 1. Then `--warmup` untimed steps each, and
`--blocks` timing blocks of about `--block-seconds` per contender, interleaved and rotated (no contender always
runs first). Reported: median step time, interquartile range over the median (`iqr`), ratio normzoo / torch.nn.

normzoo's kernels (`--policy`): `store` (the default, what a user's process gets with a warm kernel store): the
model's kernels are built into the kernel store (normzoo.precompile, NORMZOO_KERNEL_DIR) before its first step, and
kernels asked for later (a whole-model compile's layouts) are waited for before the timed steps; the layers' fast
path and the C++ node serve. `sync`: every kernel compiled in this process on its first call (NORMZOO_COMPILE=sync:
no store, no fast path, no C++ node). NORMZOO_COMPILE=0 in the environment turns normzoo's kernels off.

    python scripts/bench_models.py                            # everything (minutes: see README, Performance)
    python scripts/bench_models.py --quick                    # a tiny smoke run
    python scripts/bench_models.py --models resnet18 --norms bn --modes train --compile eager
    python scripts/bench_models.py --format markdown --output bench.md
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import types
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import Tensor, nn
from torch._dynamo.utils import counters as dynamo_counters

import normzoo
from normzoo import compiling
from normzoo.precompile import precompile
from normzoo.sweeps import report as rp

RTOL = ATOL = 1e-4  # float32 agreement of two models computing the same function
LR = 1e-3  # SGD learning rate of the train step (momentum 0.9): small, so weights stay sane over the timed steps


# --------------------------------------------------------------------------------------------------- models


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int, norm_layer) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, width * self.expansion, stride, norm_layer)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: the stride on the 3x3 conv."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int, norm_layer) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = norm_layer(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = norm_layer(width)
        self.conv3 = nn.Conv2d(width, width * self.expansion, 1, bias=False)
        self.bn3 = norm_layer(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, width * self.expansion, stride, norm_layer)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


def _downsample(cin: int, cout: int, stride: int, norm_layer):
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm_layer(cout))


class ResNet(nn.Module):
    """torchvision's ResNet layout: 7x7/2 stem conv, norm, ReLU, 3x3/2 max-pool, four stages of `blocks` (stage
    widths base_width x 1, 2, 4, 8; stride 2 from the second stage on), global average pool, linear. Every norm is
    `norm_layer(channels)`."""

    def __init__(self, block, blocks: list[int], norm_layer, base_width: int = 64, classes: int = 100) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, base_width, 7, 2, 3, bias=False)
        self.bn1 = norm_layer(base_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], base_width
        for i, n in enumerate(blocks):
            width = base_width * 2 ** i
            layers = []
            for j in range(n):
                layers.append(block(cin, width, 2 if (i > 0 and j == 0) else 1, norm_layer))
                cin = width * block.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class Attention(nn.Module):
    """timm's ViT attention: one qkv projection, scaled dot-product attention over heads, output projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d))


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, norm_layer) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = norm_layer(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A stack of pre-norm ViT blocks on token embeddings (N, tokens, dim), a final norm, a linear head on the
    first (class) token. The patch embedding is left out: the input is the tokens."""

    def __init__(self, dim: int, heads: int, depth: int, norm_layer, classes: int = 100) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"ViT width {dim} is not divisible by its {heads} heads")
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads, norm_layer) for _ in range(depth)])
        self.norm = norm_layer(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.blocks(x))[:, 0])


# --------------------------------------------------------------------------------------------------- settings


@dataclass
class Settings:
    batch_size: int = 8
    image_size: int = 128
    width: int = 64  # ResNet base width
    depth_scale: float = 1.0  # ResNet blocks per stage x this (rounded, at least 1)
    groups: int = 32
    vit_dim: int = 384
    vit_heads: int = 6
    vit_tokens: int = 197
    vit_blocks: int = 4
    classes: int = 100
    threads: int = 2
    blocks: int = 5
    block_seconds: float = 1.0
    warmup: int = 2
    seed: int = 0
    policy: str = "store"  # normzoo's kernels: "store" (built ahead, warm) or "sync" (compiled in process)


QUICK = dict(batch_size=2, image_size=64, width=32, depth_scale=0.25, vit_dim=64, vit_heads=2, vit_tokens=17,
             vit_blocks=1, classes=10, blocks=2, block_seconds=0.0, warmup=1)


@dataclass(frozen=True)
class Norm:
    """One norm choice: the layer of each side, as a factory of norm_layer(channels) from the settings."""

    label: str
    torch_layer: object  # Settings -> norm_layer
    zoo_layer: object
    models: tuple[str, ...]


NORMS = {
    "bn": Norm("BatchNorm2d", lambda s: nn.BatchNorm2d, lambda s: normzoo.BatchNorm2d, ("resnet18", "resnet50")),
    "gn": Norm("GroupNorm", lambda s: partial(nn.GroupNorm, s.groups), lambda s: partial(normzoo.GroupNorm, s.groups),
               ("resnet18", "resnet50")),
    "ln": Norm("LayerNorm", lambda s: partial(nn.LayerNorm, eps=1e-6), lambda s: partial(normzoo.LayerNorm, eps=1e-6),
               ("vit",)),
}


def _resnet_blocks(base: list[int], s: Settings) -> list[int]:
    return [max(1, int(n * s.depth_scale + 0.5)) for n in base]  # half rounds up


MODELS = {
    "resnet18": lambda s, norm_layer: ResNet(BasicBlock, _resnet_blocks([2, 2, 2, 2], s), norm_layer, s.width,
                                             s.classes),
    "resnet50": lambda s, norm_layer: ResNet(Bottleneck, _resnet_blocks([3, 4, 6, 3], s), norm_layer, s.width,
                                             s.classes),
    "vit": lambda s, norm_layer: ViT(s.vit_dim, s.vit_heads, s.vit_blocks, norm_layer, s.classes),
}
MODES = ("train", "eval")
COMPILE = ("eager", "compiled")


def model_label(name: str, s: Settings) -> str:
    if name == "vit":
        return f"ViT {s.vit_blocks}x(dim {s.vit_dim}, {s.vit_heads} heads)"
    base = [2, 2, 2, 2] if name == "resnet18" else [3, 4, 6, 3]
    blocks = _resnet_blocks(base, s)
    kind = "ResNet-18" if name == "resnet18" else "ResNet-50"
    return kind + ("" if blocks == base and s.width == 64 else f" ({'-'.join(map(str, blocks))}, width {s.width})")


def norm_label(norm: str, s: Settings) -> str:
    return f"GroupNorm({s.groups})" if norm == "gn" else NORMS[norm].label


def input_shape(name: str, s: Settings) -> tuple[int, ...]:
    if name == "vit":
        return (s.batch_size, s.vit_tokens, s.vit_dim)
    return (s.batch_size, 3, s.image_size, s.image_size)


@dataclass(frozen=True)
class Case:
    model: str
    norm: str
    mode: str
    compile: str


def cases(models: list[str], norms: list[str], modes: list[str], compile_: list[str]) -> list[Case]:
    """Every model x norm (the norms that model takes) x mode x compile setting."""
    return [Case(m, n, mode, c) for m in models for n in norms if m in NORMS[n].models for mode in modes
            for c in compile_]


# --------------------------------------------------------------------------------------------------- building


class AgreementError(AssertionError):
    """The normzoo model does not compute what the torch.nn model computes: it must not be timed."""


def build_pair(case: Case, s: Settings) -> tuple[nn.Module, nn.Module]:
    """The model with torch.nn norms (seeded init) and the same model with normzoo norms holding its state_dict."""
    norm = NORMS[case.norm]
    torch.manual_seed(s.seed)
    ref = MODELS[case.model](s, norm.torch_layer(s))
    zoo = MODELS[case.model](s, norm.zoo_layer(s))
    zoo.load_state_dict(ref.state_dict())
    return ref, zoo


def make_inputs(case: Case, s: Settings) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(s.seed + 1)
    return torch.randn(input_shape(case.model, s), generator=g), torch.randint(s.classes, (s.batch_size,), generator=g)


def _agree(what: str, ref: Tensor, zoo: Tensor) -> None:
    try:
        torch.testing.assert_close(zoo, ref, rtol=RTOL, atol=ATOL)
    except AssertionError as err:
        diff = (zoo.double() - ref.double()).abs().max().item()
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        detail = next((line for line in lines if line.startswith("Mismatched elements")), lines[0])
        raise AgreementError(f"{what}: normzoo's output differs from torch.nn's (max abs diff {diff:.3g}, rtol = "
                             f"atol = {RTOL:g}; {detail}): not timed") from None


def check_agreement(ref: nn.Module, zoo: nn.Module, x: Tensor, what: str = "model") -> None:
    """One eval forward of both models must agree (float32). normzoo's engine runs eagerly here, so the check adds
    no compiled kernel (the first timed step pays for those) and tests the layers and the state_dict alone."""
    layers = [m for m in zoo.modules() if isinstance(getattr(m, "compile", None), bool)]  # normzoo's flag
    saved = [(m, m.compile) for m in layers]
    ref_training, zoo_training = ref.training, zoo.training
    try:
        for m in layers:
            m.compile = False
        ref.eval()
        zoo.eval()
        with torch.no_grad():
            _agree(f"{what}, eval forward", ref(x), zoo(x))
    finally:
        ref.train(ref_training)
        zoo.train(zoo_training)
        for m, flag in saved:
            m.compile = flag


def _own_forward(model: nn.Module, tag: str) -> None:
    """Give this instance a forward with its own code object. Dynamo keeps compiled code per code object and runs
    eager after torch._dynamo.config.recompile_limit entries; every case builds models of the same classes, so
    without this the later cases would silently run eager."""
    f = type(model).forward
    code = f.__code__.replace(co_name=f"forward_{tag}")
    model.forward = types.MethodType(types.FunctionType(code, f.__globals__, code.co_name, f.__defaults__,
                                                        f.__closure__), model)


def make_step(model: nn.Module, case: Case, x: Tensor, y: Tensor, tag: str):
    """One step as users run it; returns the logits (detached) of its forward."""
    model.train(case.mode == "train")
    fwd = model
    if case.compile == "compiled":
        _own_forward(model, tag)
        fwd = torch.compile(model)
    if case.mode == "eval":
        def step():
            with torch.no_grad():
                return fwd(x)
        return step

    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)

    def train_step():
        opt.zero_grad(set_to_none=True)
        out = fwd(x)
        F.cross_entropy(out, y).backward()
        opt.step()
        return out.detach()
    return train_step


# --------------------------------------------------------------------------------------------------- timing


@dataclass
class Contender:
    name: str
    step: object
    times: list[float] = field(default_factory=list)
    graphs: int = 0  # dynamo graphs compiled during its steps
    kernels: int = 0  # normzoo kernels compiled during its steps
    first_s: float | None = None
    first_out: Tensor | None = None

    def run(self, timed: bool = True):
        graphs, kernels = dynamo_counters["stats"]["unique_graphs"], compiling.cache_info()["compiles"]
        start = time.perf_counter()
        out = self.step()
        elapsed = time.perf_counter() - start
        own = compiling.cache_info()["compiles"] - kernels  # normzoo's kernels are dynamo graphs of their own
        self.graphs += dynamo_counters["stats"]["unique_graphs"] - graphs - own
        self.kernels += own
        if timed:
            self.times.append(elapsed)
        return out, elapsed


def _quartiles(v: list[float]) -> tuple[float, float, float]:
    if len(v) == 1:
        return v[0], v[0], v[0]
    q1, med, q3 = statistics.quantiles(v, n=4, method="inclusive")
    return q1, med, q3


_tag = 0


def run_case(case: Case, s: Settings) -> dict:
    global _tag
    _tag += 1
    torch.set_num_threads(s.threads)
    row = {"model": case.model, "model_label": model_label(case.model, s), "norm": case.norm,
           "norm_label": norm_label(case.norm, s), "mode": case.mode, "compile": case.compile,
           "input": list(input_shape(case.model, s)), "threads": s.threads, "note": None}
    empty = {"ms": None, "iqr": None, "first_s": None, "steps": 0, "graphs": None, "kernels": None}
    row.update(torch=dict(empty), normzoo=dict(empty), ratio=None)
    what = f"{row['model_label']} {row['norm_label']} {case.mode} {case.compile}"

    ref, zoo = build_pair(case, s)
    x, y = make_inputs(case, s)
    try:
        check_agreement(ref, zoo, x, what)
    except AgreementError as err:
        row["note"] = str(err)
        return row
    contenders = [Contender("torch", make_step(ref, case, x, y, f"torch_{_tag}")),
                  Contender("normzoo", make_step(zoo, case, x, y, f"normzoo_{_tag}"))]
    store = s.policy == "store" and compiling.compile_enabled()
    if store:  # a warm store: the kernels of the model's eager calls built before its first step
        started = time.perf_counter()
        precompile(zoo, x, grad=case.mode == "train", progress=False)
        row["normzoo"]["store_s"] = round(time.perf_counter() - started, 1)
    first_compiles = {}
    for c in contenders:  # the first step: whole-model compile or normzoo's kernel compiles happen here
        c.first_out, c.first_s = c.run(timed=False)
        row[c.name]["first_s"] = round(c.first_s, 3)
        first_compiles[c.name] = (c.graphs, c.kernels)
    try:
        _agree(f"{what}, first step", contenders[0].first_out, contenders[1].first_out)
    except AgreementError as err:
        row["note"] = str(err)
        return row
    for c in contenders:
        for _ in range(s.warmup):
            c.run(timed=False)
    if store:  # kernels first asked for by the steps (a whole-model compile's layouts): built, then loaded
        started = time.perf_counter()
        while normzoo.cache_info()["background"]["pending"] and time.perf_counter() - started < 1800:
            time.sleep(0.5)
        row["normzoo"]["store_s"] += round(time.perf_counter() - started, 1)
        for _ in range(max(1, s.warmup)):
            contenders[1].run(timed=False)
    # steps per block: about block_seconds of the slower contender's steady step (at least 1)
    probe = max(min(c.run()[1] for _ in range(2)) for c in contenders)
    for c in contenders:
        c.times.clear()
    per_block = max(1, round(s.block_seconds / max(probe, 1e-6)))
    gc.collect()
    for b in range(s.blocks):  # interleaved, rotated: no contender always runs first
        for c in contenders[b % 2:] + contenders[:b % 2]:
            for _ in range(per_block):
                c.run()

    for c in contenders:
        q1, med, q3 = _quartiles(c.times)
        row[c.name].update(ms=med * 1e3, iqr=(q3 - q1) / med if med > 0 else 0.0, steps=len(c.times),
                           graphs=c.graphs if case.compile == "compiled" else None, kernels=c.kernels)
    row["ratio"] = row["normzoo"]["ms"] / row["torch"]["ms"]
    notes = []
    if case.compile == "compiled" and contenders[1].graphs > contenders[0].graphs:
        notes.append(f"normzoo's model compiled {contenders[1].graphs} graphs, torch.nn's {contenders[0].graphs} "
                     f"(graph breaks)")
    for c in contenders:  # a steady state compiles nothing: a later compile was timed as a step
        graphs, kernels = c.graphs - first_compiles[c.name][0], c.kernels - first_compiles[c.name][1]
        if graphs or kernels:
            notes.append(f"{c.name} compiled {graphs} graphs and {kernels} normzoo kernels after its first step")
    row["note"] = "; ".join(notes) or None
    return row


# --------------------------------------------------------------------------------------------------- report


def environment(s: Settings) -> dict:
    env = rp.environment("cpu", s.threads)
    env["isa"] = torch.backends.cpu.get_cpu_capability()
    env["normzoo_compile"] = compiling.compile_enabled()
    env["normzoo_kernels"] = s.policy if env["normzoo_compile"] else "off"
    return env


def _ms(v) -> str:
    return "-" if v is None else (f"{v:.1f}" if v >= 10 else f"{v:.2f}")


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def _s(v) -> str:
    return "-" if v is None else (f"{v:.2f}" if v < 1 else f"{v:.1f}")


COLUMNS = [
    rp.Column("model", lambda r: r["model_label"]),
    rp.Column("norm", lambda r: r["norm_label"]),
    rp.Column("mode", lambda r: r["mode"]),
    rp.Column("compile", lambda r: r["compile"]),
    rp.Column("torch\nms", lambda r: _ms(r["torch"]["ms"]), "right"),
    rp.Column("torch\niqr", lambda r: _pct(r["torch"]["iqr"]), "right"),
    rp.Column("normzoo\nms", lambda r: _ms(r["normzoo"]["ms"]), "right"),
    rp.Column("normzoo\niqr", lambda r: _pct(r["normzoo"]["iqr"]), "right"),
    rp.Column("ratio", lambda r: "-" if r["ratio"] is None else f"{r['ratio']:.2f}", "right"),
    rp.Column("torch\nfirst s", lambda r: _s(r["torch"]["first_s"]), "right"),
    rp.Column("normzoo\nfirst s", lambda r: _s(r["normzoo"]["first_s"]), "right"),
]

METHOD = ("median step time over every step of the interleaved, rotated timing blocks; iqr = interquartile range "
          "/ median; ratio = normzoo / torch.nn (below 1: normzoo is faster); first s = the first step, timed apart "
          "(the whole-model compile, or normzoo's kernel compiles, happen there); train = forward + cross-entropy + "
          "backward + SGD step in train mode; eval = forward under torch.no_grad in eval mode; compiled = "
          "torch.compile(model) of the whole model")


def build_report(results: list[dict], s: Settings, env: dict, wall_s: float | None = None) -> dict:
    ratios = [r["ratio"] for r in results if r["ratio"]]
    return {
        "kind": "bench_models",
        "environment": env,
        "settings": vars(s),
        "summary": {"cases": len(results),
                    "ratio_geomean": round(statistics.geometric_mean(ratios), 3) if ratios else None,
                    "faster": sum(1 for r in ratios if r < 1), "slower": sum(1 for r in ratios if r >= 1),
                    "not_timed": sum(1 for r in results if r["ratio"] is None),
                    **({"wall_s": round(wall_s, 1)} if wall_s is not None else {})},
        "method": METHOD,
        "notes": [f"{r['model_label']} {r['norm_label']} {r['mode']} {r['compile']}: {r['note']}"
                  for r in results if r.get("note")],
        "cases": results,
    }


_KERNELS = {"store": "the kernel store, built before the first step, with the fast path and C++ node",
            "sync": "compiled in process on first call (NORMZOO_COMPILE=sync)", "off": "off: NORMZOO_COMPILE"}


def header(report: dict) -> list[str]:
    """The machine and settings the numbers belong to."""
    env, s = report["environment"], report["settings"]
    return [
        "Whole-model steady-state step time, torch.nn norm layers vs normzoo layers "
        f"(scripts/bench_models.py, {env['date']}).",
        f"Machine: {env['cpu']}, vector ISA {env['isa']}, {env['cpu_count']} logical CPUs, load average at the "
        f"start {env['load_avg']}; torch {env['torch']}, normzoo {env['normzoo']} (kernels: "
        f"{_KERNELS[env.get('normzoo_kernels', 'sync')]}); threads {s['threads']}"
        + (f"; allocator settings {env['allocator']}" if env["allocator"] else "") + ".",
        f"Inputs: batch {s['batch_size']}; ResNets 3x{s['image_size']}x{s['image_size']}, base width {s['width']}, "
        f"depth scale {s['depth_scale']:g}; ViT {s['vit_tokens']} tokens x {s['vit_dim']}, {s['vit_heads']} heads, "
        f"depth {s['vit_blocks']}; timing: {s['blocks']} blocks of about {s['block_seconds']:g} s (at least one "
        f"step) per contender, after {s['warmup']} warm-up steps.",
        f"Method: {report['method']}.",
    ]


def render(report: dict, fmt: str) -> str:
    if fmt in ("json", "csv"):
        return rp.render(report, fmt, COLUMNS)
    rows = [[col.get(c) for col in COLUMNS] for c in report["cases"]]
    align = [col.align for col in COLUMNS]
    if fmt == "markdown":
        table = tabulate(rows, [col.header.replace("\n", " ") for col in COLUMNS], tablefmt="github",
                         colalign=align, disable_numparse=True)
        lines = [*header(report), "", table, "", f"**{rp.summary_line(report)}**"]
        lines += [""] * bool(report["notes"]) + [f"- {n}" for n in report["notes"]]
    else:
        table = tabulate(rows, [col.header for col in COLUMNS], tablefmt="normzoo", colalign=align,
                         disable_numparse=True)
        lines = [*header(report), "", table, "", rp.summary_line(report), *report["notes"]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------- main


def _choices(text: str, allowed, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"{what}: unknown {bad or text!r}; choose from {', '.join(allowed)}")
    return items


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=lambda t: _choices(t, MODELS, "--models"), default=list(MODELS),
                   help=f"comma-separated (default: {','.join(MODELS)})")
    p.add_argument("--norms", type=lambda t: _choices(t, NORMS, "--norms"), default=list(NORMS),
                   help="comma-separated: bn, gn (the ResNets), ln (the ViT) (default: all)")
    p.add_argument("--modes", type=lambda t: _choices(t, MODES, "--modes"), default=list(MODES),
                   help="comma-separated: train, eval (default: both)")
    p.add_argument("--compile", type=lambda t: _choices(t, COMPILE, "--compile"), default=list(COMPILE),
                   help="comma-separated: eager, compiled (whole-model torch.compile) (default: both)")
    d = Settings()
    for name, help_ in [("batch_size", "images (or token sequences) per step"),
                        ("image_size", "ResNet input side"), ("width", "ResNet base width (stages: x1, x2, x4, x8)"),
                        ("depth_scale", "ResNet blocks per stage x this, rounded, at least 1"),
                        ("groups", "GroupNorm groups"), ("vit_dim", "ViT width"), ("vit_heads", "ViT heads"),
                        ("vit_tokens", "ViT tokens"), ("vit_blocks", "ViT blocks"), ("classes", "classifier outputs"),
                        ("threads", "torch threads"), ("blocks", "timing blocks per contender"),
                        ("block_seconds", "seconds per timing block and contender (at least one step)"),
                        ("warmup", "untimed steps per contender after the first"), ("seed", "seed of init and data")]:
        default = getattr(d, name)
        p.add_argument("--" + name.replace("_", "-"), type=type(default), default=None,
                       help=f"{help_} (default: {default}{', --quick: ' + str(QUICK[name]) if name in QUICK else ''})")
    p.add_argument("--policy", choices=["store", "sync"], default=None,
                   help="normzoo's kernels: store (built before the first step, warm; default) or sync (compiled "
                        "in process on first call)")
    p.add_argument("--quick", action="store_true", help="a tiny smoke run: small models and inputs, 2 blocks of 1 step")
    p.add_argument("--format", choices=["table", "markdown", "json", "csv"], default="table")
    p.add_argument("--output", metavar="PATH", help="write the report there (rewritten after every case)")
    args = p.parse_args(argv)
    values = {**vars(d), **(QUICK if args.quick else {})}
    values.update({k: v for k, v in vars(args).items() if k in values and v is not None})
    s = Settings(**values)
    for name in ("batch_size", "image_size", "width", "groups", "vit_dim", "vit_heads", "vit_tokens", "vit_blocks",
                 "classes", "threads", "blocks"):
        if getattr(s, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(s, name)}")
    if s.depth_scale <= 0 or s.block_seconds < 0 or s.warmup < 0:
        p.error("--depth-scale must be positive, --block-seconds and --warmup not negative")
    if "bn" in args.norms and s.batch_size < 2 and "train" in args.modes:
        p.error("BatchNorm training needs --batch-size of at least 2")
    if "gn" in args.norms and s.width % s.groups:
        p.error(f"GroupNorm({s.groups}) needs a --width divisible by {s.groups}, got {s.width}")
    if "vit" in args.models and s.vit_dim % s.vit_heads:
        p.error(f"--vit-dim {s.vit_dim} is not divisible by --vit-heads {s.vit_heads}")
    todo = cases(args.models, args.norms, args.modes, args.compile)
    if not todo:
        p.error(f"no case: the norms {args.norms} fit none of the models {args.models} "
                f"(bn, gn: resnet18, resnet50; ln: vit)")
    return args, s, todo


def main(argv: list[str] | None = None) -> int:
    args, s, todo = parse_args(argv)
    if compiling.compile_enabled():  # NORMZOO_COMPILE=0 keeps normzoo's kernels off
        os.environ["NORMZOO_COMPILE"] = "1" if s.policy == "store" else "sync"
    torch.set_num_threads(s.threads)
    env = environment(s)
    start = time.perf_counter()

    def on_update(report):
        if args.output:
            rp.write(args.output, render(report, args.format))

    report, interrupted = rp.drive(
        todo, lambda case: run_case(case, s), lambda results, _: build_report(results, s, env), on_update,
        label=lambda c: f"{c.model} {c.norm} {c.mode} {c.compile}")
    report = build_report(report["cases"], s, env, time.perf_counter() - start)
    if interrupted:
        report["notes"].append(f"interrupted: {len(report['cases'])} of {len(todo)} cases finished")
    on_update(report)
    print(render(report, args.format), end="")
    if args.output:
        print(f"wrote {args.output}", file=sys.stderr)
    if interrupted:
        return 130
    return 1 if report["summary"]["not_timed"] else 0


if __name__ == "__main__":
    sys.exit(main())
