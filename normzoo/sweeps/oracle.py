"""What the zoo is checked against: a float64 oracle written apart from normzoo's engine, and torch.nn itself.

The oracle is the textbook math in float64, two passes (mean, then the biased variance of x - mean), per family,
with autograd in float64 for the gradients (RMSNorm: the mean square, nothing subtracted). It reads only the layer's
configuration (groups, eps, momentum, affine tensors, running buffers), never normzoo's engine.

torch's side is torch.nn's layer where there is one (torch.nn.RMSNorm for RMSNorm), and for LayerNorm2d what people
write today: permute to channels last, F.layer_norm over C, permute back (timm's and torchvision's LayerNorm2d).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import layers as zl
from ..frozen import FrozenBatchNorm2d
from ..sync import SyncBatchNorm

TORCH_ACTIVATIONS = {
    "silu": lambda: nn.SiLU(),
    "relu": lambda: nn.ReLU(),
    "gelu": lambda: nn.GELU(),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
}
_F64_ACTIVATIONS = {
    "silu": lambda t: t * torch.sigmoid(t),
    "relu": lambda t: t.clamp_min(0),
    "gelu": lambda t: 0.5 * t * (1 + torch.erf(t / 2 ** 0.5)),
    "gelu_tanh": lambda t: 0.5 * t * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (t + 0.044715 * t ** 3))),
}


def _torch_batchnorm(ndim: int | None):
    return {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 5: nn.BatchNorm3d}.get(ndim, nn.BatchNorm2d)


class PermuteLayerNorm2d(nn.LayerNorm):
    """The channels-first LayerNorm as people write it (timm's and torchvision's LayerNorm2d): move C last,
    F.layer_norm over it, move it back. torch's reference for normzoo.LayerNorm2d; (N, C, *) inputs."""

    def forward(self, x: Tensor) -> Tensor:
        y = nn.functional.layer_norm(x.movedim(1, -1), self.normalized_shape, self.weight, self.bias, self.eps)
        return y.movedim(-1, 1)


def torch_counterpart(zoo: nn.Module, ndim: int | None = None) -> nn.Module:
    """The torch.nn layer doing what `zoo` does, with the same state (followed by the activation, if any).

    `ndim`, the input's number of dims, picks BatchNorm1d/2d/3d for normzoo's any-dims SyncBatchNorm and
    FrozenBatchNorm2d (a frozen layer is torch's BatchNorm in eval mode with its affine not learned).
    """
    if isinstance(zoo, FrozenBatchNorm2d):
        t = _torch_batchnorm(ndim)(zoo.num_features, zoo.eps)
        t.weight.requires_grad_(False)
        t.bias.requires_grad_(False)
        t = t.to(dtype=zoo.running_mean.dtype, device=zoo.running_mean.device)
        state = dict(zoo.state_dict(), num_batches_tracked=t.num_batches_tracked)
        t.load_state_dict(state)
        t.eval()
        return nn.Sequential(t, TORCH_ACTIVATIONS[zoo.activation]()) if zoo.activation else t
    if isinstance(zoo, SyncBatchNorm):
        t = _torch_batchnorm(ndim)(zoo.num_features, zoo.eps, zoo.momentum, zoo.affine, zoo.track_running_stats,
                                   bias=zoo.bias is not None or not zoo.affine)
    elif isinstance(zoo, zl.GroupNorm):
        t = nn.GroupNorm(zoo.num_groups, zoo.num_channels, zoo.eps, zoo.affine,
                         bias=zoo.bias is not None or not zoo.affine)
    elif isinstance(zoo, zl.LayerNorm):
        t = nn.LayerNorm(zoo.normalized_shape, zoo.eps, zoo.elementwise_affine,
                         bias=zoo.bias is not None or not zoo.elementwise_affine)
    elif isinstance(zoo, zl.RMSNorm):
        t = nn.RMSNorm(zoo.normalized_shape, zoo.eps, zoo.elementwise_affine)
    elif isinstance(zoo, zl.LayerNorm2d):
        t = PermuteLayerNorm2d(zoo.num_channels, zoo.eps, zoo.affine)
    elif isinstance(zoo, (zl._InstanceNorm, zl._BatchNorm)):
        t = getattr(nn, type(zoo).__name__)(zoo.num_features, zoo.eps, zoo.momentum, zoo.affine,
                                             zoo.track_running_stats, bias=zoo.bias is not None or not zoo.affine)
    else:
        raise TypeError(f"no torch.nn counterpart for {type(zoo).__name__}")
    p = next(zoo.parameters(), None)
    t = t.to(dtype=p.dtype if p is not None else torch.float32, device=_device(zoo))
    t.load_state_dict(zoo.state_dict())
    t.train(zoo.training)
    if zoo.activation is not None:
        t = nn.Sequential(t, TORCH_ACTIVATIONS[zoo.activation]())
    return t


def norm_of(module: nn.Module) -> nn.Module:
    """The norm layer inside a counterpart (the first of an activation Sequential)."""
    return module[0] if isinstance(module, nn.Sequential) else module


def _device(m: nn.Module) -> torch.device:
    for t in list(m.parameters()) + list(m.buffers()):
        return t.device
    return torch.device("cpu")


# The oracle always computes on the CPU: the same values whichever device the layer under test runs on (a cpu and a
# cuda report are checked against identical numbers), and no kernel shared with that device. The equivalence
# sweeps' inputs are small; the speed sweep asks it only where a contender disagrees with torch eager.
ORACLE_DEVICE = torch.device("cpu")


def _f64(t: Tensor | None) -> Tensor | None:
    """A float64 copy on the oracle's device (the CPU), whatever device the layer is on."""
    return None if t is None else t.detach().to(device=ORACLE_DEVICE, dtype=torch.float64)


def _normalize(x: Tensor, dims: tuple[int, ...], eps: float, *, unbiased: bool = False,
               eps_outside: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Two-pass float64 statistics over dims: (x - mean) / sqrt(var + eps), mean, biased var.

    The two switches are the usual mistakes, for `normzoo.check`'s diagnosis: `unbiased` divides the variance by
    n - 1 (the returned var is then the unbiased one), `eps_outside` divides by sqrt(var) + eps.
    """
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    if unbiased:
        n = x.numel() // max(mean.numel(), 1)
        var = var * n / (n - 1) if n > 1 else var * math.nan
    std = torch.sqrt(var) + eps if eps_outside else torch.sqrt(var + eps)
    return (x - mean) / std, mean, var


def _affine(y: Tensor, w: Tensor | None, b: Tensor | None, shape) -> Tensor:
    if w is not None:
        y = y * w.reshape(shape)
    if b is not None:
        y = y + b.reshape(shape)
    return y


class Reference:
    """Float64 copy of a layer's configuration and state; `forward` is the oracle for one call of the layer.

    Running buffers (BatchNorm) evolve across calls exactly as the layer's should: EMA with momentum of the batch
    mean and the unbiased batch variance, or the cumulative average when momentum is None.
    Everything lives on ORACLE_DEVICE (the CPU), whatever the layer's device: `forward` copies its input there
    (differentiably) and returns CPU tensors.
    `dtype`: the dtype the layer is fed (the oracle is fed float64), for RMSNorm's eps=None, which means
    torch.finfo of the dtype the arithmetic runs in (float32 for float16/bfloat16); default: the layer's parameters'.
    """

    def __init__(self, zoo: nn.Module, dtype: torch.dtype | None = None) -> None:
        self.zoo = zoo
        p = next(zoo.parameters(), None)
        dtype = dtype or (p.dtype if p is not None else torch.float32)
        self.eps = getattr(zoo, "eps", None)
        if self.eps is None and isinstance(zoo, zl.RMSNorm):
            self.eps = torch.finfo(dtype if dtype in (torch.float32, torch.float64) else torch.float32).eps
        self.weight = _f64(zoo.weight) if getattr(zoo, "weight", None) is not None else None
        self.bias = _f64(zoo.bias) if getattr(zoo, "bias", None) is not None else None
        for name in ("weight", "bias"):  # learnable where the layer's are (a frozen layer's are buffers)
            if getattr(self, name) is not None and getattr(zoo, name).requires_grad:
                getattr(self, name).requires_grad_(True)
        self.running_mean = _f64(getattr(zoo, "running_mean", None))
        self.running_var = _f64(getattr(zoo, "running_var", None))
        self.batches = 0
        self.device = ORACLE_DEVICE

    def params(self) -> list[Tensor]:
        return [p for p in (self.weight, self.bias) if p is not None and p.requires_grad]

    def forward(self, x: Tensor, training: bool) -> Tensor:
        z, x = self.zoo, x.to(device=self.device, dtype=torch.float64)
        n, c = x.shape[0], x.shape[1] if x.dim() > 1 else None
        if isinstance(z, zl.GroupNorm):
            xg = x.reshape(n, z.num_groups, -1)
            y, _, _ = _normalize(xg, (2,), z.eps)
            y = _affine(y.reshape(x.shape), self.weight, self.bias, (1, c) + (1,) * (x.dim() - 2))
        elif isinstance(z, zl.LayerNorm):
            k = len(z.normalized_shape)
            y, _, _ = _normalize(x, tuple(range(x.dim() - k, x.dim())), z.eps)
            y = _affine(y, self.weight, self.bias, z.normalized_shape)
        elif isinstance(z, zl.RMSNorm):  # no centring: x / sqrt(mean(x^2) + eps)
            dims = tuple(range(x.dim() - len(z.normalized_shape), x.dim()))
            y = x / torch.sqrt((x * x).mean(dims, keepdim=True) + self.eps)
            y = _affine(y, self.weight, None, z.normalized_shape)
        elif isinstance(z, zl.LayerNorm2d):  # over the channels at each (sample, position)
            y, _, _ = _normalize(x, (1,), z.eps)
            y = _affine(y, self.weight, self.bias, (1, c) + (1,) * (x.dim() - 2))
        elif isinstance(z, zl._InstanceNorm):
            y, _, _ = _normalize(x, tuple(range(2, x.dim())), z.eps)
            y = _affine(y, self.weight, self.bias, (1, c) + (1,) * (x.dim() - 2))
        elif isinstance(z, (zl._BatchNorm, FrozenBatchNorm2d)):
            shape = (1, c) + (1,) * (x.dim() - 2)
            dims = (0,) + tuple(range(2, x.dim()))
            if isinstance(z, FrozenBatchNorm2d):
                training = False
            if training or self.running_mean is None:
                y, mean, var = _normalize(x, dims, z.eps)
                if training and self.running_mean is not None:
                    self._update(mean.detach().reshape(-1), var.detach().reshape(-1), x.numel() // c)
            else:
                rm, rv = self.running_mean.reshape(shape), self.running_var.reshape(shape)
                y = (x - rm) / torch.sqrt(rv + z.eps)
            y = _affine(y, self.weight, self.bias, shape)
        else:
            raise TypeError(f"no oracle for {type(z).__name__}")
        if z.activation is not None:
            y = _F64_ACTIVATIONS[z.activation](y)
        return y

    def _update(self, mean: Tensor, var: Tensor, n: int) -> None:
        self.batches += 1
        m = self.zoo.momentum
        factor = 1.0 / self.batches if m is None else m
        unbiased = var * n / max(n - 1, 1)
        self.running_mean = (1 - factor) * self.running_mean + factor * mean
        self.running_var = (1 - factor) * self.running_var + factor * unbiased




__all__ = ["Reference", "torch_counterpart", "norm_of", "TORCH_ACTIVATIONS"]
