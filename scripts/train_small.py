#!/usr/bin/env python
"""The small-batch study: BatchNorm degrades at small batches, GroupNorm does not (Wu and He, 2018, Figure 1).

Trains a small conv net, whose norm layers are picked by normzoo preset name from a YAML model config
(configs/small_net.yaml), on oriented gratings generated in code (nothing is downloaded), for every norm and batch
size of the config's study, with the learning rate scaled linearly with the batch size and the same number of
epochs for all. Validation runs in eval mode, so BatchNorm uses the running statistics gathered at that batch size.
Prints a table (tabulate) of final validation accuracy, norm x batch size; --plot PATH writes a PNG (matplotlib).

    python scripts/train_small.py                      # the full study (a few minutes on 2 cores)
    python scripts/train_small.py --quick              # a scaled-down run (the test suite's)
    python scripts/train_small.py --norms bn gn8 --batch-sizes 32 2 --plot study.png
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from importlib import resources
from pathlib import Path

import torch
from tabulate import tabulate
from torch import nn

import normzoo

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "small_net.yaml"


# --------------------------------------------------------------------------------------------------- config


def load_config(path: str | Path | None, quick: bool = False) -> dict:
    """The YAML config, with its `quick` section merged over it when `quick`."""
    if path is None:
        if DEFAULT_CONFIG.exists():
            path = DEFAULT_CONFIG
        else:  # an installed normzoo ships the configs as package data
            text = resources.files("normzoo.configs").joinpath("small_net.yaml").read_text()
            return _finish_config(normzoo.registry.load_yaml(text), quick, "normzoo/configs/small_net.yaml")
    path = Path(path)
    try:
        data = normzoo.registry.load_yaml(path.read_text())
    except OSError as err:
        raise SystemExit(f"error: cannot read config {path}: {err.strerror}") from None
    return _finish_config(data, quick, str(path))


def _finish_config(data, quick: bool, where: str) -> dict:
    if not isinstance(data, dict):
        raise SystemExit(f"error: {where}: a config is a mapping with model/data/train/study sections")
    for section in ("model", "data", "train", "study"):
        if not isinstance(data.get(section), dict):
            raise SystemExit(f"error: {where}: missing section {section!r}")
    if quick:
        for section, values in (data.get("quick") or {}).items():
            data[section] = {**data.get(section, {}), **values}
    for norm in data["study"]["norms"] + [data["model"]["norm"]]:
        try:
            normzoo.registry.resolve_spec(norm)
        except normzoo.registry.PresetError as err:
            raise SystemExit(f"error: {where}: {err}") from None
    return data


# --------------------------------------------------------------------------------------------------- data


def make_gratings(n: int, cfg: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n noisy gratings of `classes` orientations (the label), with random frequency, phase, contrast, brightness
    and a Gaussian window at a random place: only spatial structure tells the classes apart."""
    g = torch.Generator().manual_seed(seed)
    size, classes = cfg["image_size"], cfg["classes"]
    labels = torch.randint(classes, (n,), generator=g)
    spacing = math.pi / classes
    theta = labels * spacing + (torch.rand(n, generator=g) - 0.5) * spacing * 0.5
    freq = 2 * math.pi * (0.12 + 0.16 * torch.rand(n, generator=g))  # 3.5 to 8 pixels per cycle
    phase = 2 * math.pi * torch.rand(n, generator=g)
    lo, hi = cfg["contrast"]
    contrast = torch.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * torch.rand(n, generator=g))
    offset = cfg["offset"] * torch.randn(n, generator=g)
    center = (torch.rand(n, 2, generator=g) - 0.5) * size * 0.5
    width = size * (0.25 + 0.15 * torch.rand(n, generator=g))
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    c, s = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    wave = torch.sin(freq[:, None, None] * (xx * c + yy * s) + phase[:, None, None])
    dx, dy = xx - center[:, 0, None, None], yy - center[:, 1, None, None]
    window = torch.exp(-(dx * dx + dy * dy) / (2 * width[:, None, None] ** 2))
    images = contrast[:, None, None] * wave * window + offset[:, None, None]
    images = images + cfg["noise"] * torch.randn(n, size, size, generator=g)
    return images.unsqueeze(1), labels


# --------------------------------------------------------------------------------------------------- model


class SmallNet(nn.Module):
    """Stages of conv-norm-relu (two convs in the first stage, one after), a 2x2 max-pool between stages, global
    average pool, linear. Every norm is `norm_layer(channels)`, e.g. normzoo.norm_factory("gn8")."""

    def __init__(self, in_channels: int, widths: list[int], classes: int, norm_layer, image_size: int = 16,
                 head: str = "avgpool") -> None:
        super().__init__()
        if head not in ("avgpool", "flatten"):
            raise ValueError(f"head must be 'avgpool' or 'flatten', got {head!r}")

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), norm_layer(cout), nn.ReLU(inplace=True)]

        layers = block(in_channels, widths[0]) + block(widths[0], widths[0])
        for cin, cout in zip(widths, widths[1:]):
            layers += [nn.MaxPool2d(2)] + block(cin, cout)
        side = image_size // 2 ** (len(widths) - 1)
        pool = [nn.AdaptiveAvgPool2d(1)] if head == "avgpool" else []
        self.features = nn.Sequential(*layers, *pool, nn.Flatten())
        self.head = nn.Linear(widths[-1] * (1 if head == "avgpool" else side * side), classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_model(cfg: dict, norm: str | None = None) -> nn.Module:
    m = cfg["model"]
    factory = normzoo.norm_factory(norm or m["norm"], compile=bool(cfg["train"].get("compile", False)))
    return SmallNet(m["in_channels"], m["widths"], cfg["data"]["classes"], factory, cfg["data"]["image_size"],
                    m.get("head", "avgpool"))


# --------------------------------------------------------------------------------------------------- training


def train_one(cfg: dict, norm: str, batch_size: int, data) -> dict:
    """Train from a fixed seed; return final validation accuracy (eval mode) and timing."""
    torch.set_num_threads(1)
    (xtr, ytr), (xva, yva) = data
    t = cfg["train"]
    torch.manual_seed(t["seed"])
    model = build_model(cfg, norm)
    lr = t["base_lr"] * batch_size / t["base_batch"]
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=t["momentum"], weight_decay=t["weight_decay"])
    steps_per_epoch = len(xtr) // batch_size
    total = steps_per_epoch * t["epochs"]
    warmup = int(steps_per_epoch * t.get("warmup_epochs", 0))

    def schedule(i: int) -> float:  # linear warmup (Goyal et al.), then cosine to zero
        if i < warmup:
            return (i + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    g = torch.Generator().manual_seed(t["seed"] + 1)
    start = time.perf_counter()
    model.train()
    for _ in range(t["epochs"]):
        order = torch.randperm(len(xtr), generator=g)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    train_s = time.perf_counter() - start
    if not math.isfinite(loss.item()):
        return {"norm": norm, "batch_size": batch_size, "val_acc": float("nan"), "train_s": train_s}
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(xva), 256):
            correct += (model(xva[i:i + 256]).argmax(1) == yva[i:i + 256]).sum().item()
    return {"norm": norm, "batch_size": batch_size, "val_acc": 100.0 * correct / len(xva), "train_s": train_s,
            "steps": total}


def _job(args):
    cfg, norm, batch_size = args
    return train_one(cfg, norm, batch_size, _data(cfg))


_DATA_CACHE: dict = {}


def _data(cfg: dict):
    d = cfg["data"]
    key = repr(sorted(d.items()))
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = (make_gratings(d["train_size"], d, d["seed"]),
                            make_gratings(d["val_size"], d, d["seed"] + 10_000))
    return _DATA_CACHE[key]


def run_study(cfg: dict, workers: int = 1) -> list[dict]:
    """Every norm x batch size of cfg["study"]; runs are independent and seeded, so `workers` does not change the
    numbers (each worker process uses one thread)."""
    jobs = [(cfg, norm, bs) for bs in cfg["study"]["batch_sizes"] for norm in cfg["study"]["norms"]]
    jobs.sort(key=lambda j: j[2])  # smallest batches (most steps) first, for an even spread over workers
    if workers <= 1:
        return [_job(j) for j in jobs]
    import multiprocessing as mp

    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        return list(pool.map(_job, jobs))


def table(results: list[dict], norms: list[str], batch_sizes: list[int], fmt: str = "github") -> str:
    acc = {(r["norm"], r["batch_size"]): r["val_acc"] for r in results}
    sizes = sorted(batch_sizes, reverse=True)
    rows = [[norm] + [f"{acc[(norm, b)]:.1f}" for b in sizes] for norm in norms]
    return tabulate(rows, headers=["norm \\ batch size"] + [str(b) for b in sizes], tablefmt=fmt,
                    disable_numparse=True)


def plot(results: list[dict], norms: list[str], batch_sizes: list[int], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: --plot needs matplotlib: pip install 'normzoo[plot]' (or pip install matplotlib)")
    acc = {(r["norm"], r["batch_size"]): r["val_acc"] for r in results}
    sizes = sorted(batch_sizes, reverse=True)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for norm in norms:
        ax.plot(range(len(sizes)), [100 - acc[(norm, b)] for b in sizes], marker="o", label=norm)
    ax.set_xticks(range(len(sizes)), [str(b) for b in sizes])
    ax.set_xlabel("batch size (images per step)")
    ax.set_ylabel("validation error (%)")
    ax.set_title("Small-batch study (cf. Wu & He 2018, Fig. 1)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help=f"YAML model config (default: {DEFAULT_CONFIG.name})")
    p.add_argument("--quick", action="store_true", help="the config's scaled-down `quick` study")
    p.add_argument("--norms", nargs="+", help="preset names (override the config's study.norms)")
    p.add_argument("--batch-sizes", nargs="+", type=int, help="override the config's study.batch_sizes")
    p.add_argument("--epochs", type=int, help="override train.epochs")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="parallel runs, one thread each (default: min(2, CPUs))")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of validation error vs batch size")
    p.add_argument("--format", default="github", help="tabulate table format (default: github)")
    args = p.parse_args(argv)

    cfg = load_config(args.config, args.quick)
    cfg = copy.deepcopy(cfg)
    if args.norms:
        cfg["study"]["norms"] = args.norms
        _finish_config(cfg, False, "--norms")
    if args.batch_sizes:
        if any(b < 2 for b in args.batch_sizes):
            p.error("batch sizes must be at least 2 (BatchNorm needs 2 values per channel)")
        cfg["study"]["batch_sizes"] = args.batch_sizes
    if args.epochs:
        cfg["train"]["epochs"] = args.epochs
    norms, sizes = cfg["study"]["norms"], cfg["study"]["batch_sizes"]
    for b in sizes:
        if cfg["data"]["train_size"] < b:
            p.error(f"batch size {b} is larger than the training set ({cfg['data']['train_size']})")

    start = time.perf_counter()
    results = run_study(cfg, args.workers)
    wall = time.perf_counter() - start
    print(f"Validation accuracy (%), eval mode, after {cfg['train']['epochs']} epochs of "
          f"{cfg['data']['train_size']} images; lr {cfg['train']['base_lr']} x batch/{cfg['train']['base_batch']}; "
          f"chance {100 / cfg['data']['classes']:.1f}%")
    print(table(results, norms, sizes, args.format))
    print(f"\n{len(results)} runs in {wall:.0f} s wall, {args.workers} worker(s) x 1 thread, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}")
    if args.plot:
        plot(results, norms, sizes, args.plot)
        print(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
