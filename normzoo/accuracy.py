"""How far a result is from the float64 oracle, and how far it may be: the measures both the sweeps and
`normzoo check` use.

    error = max|got - oracle| / max|oracle|   (rel_err, in float64)
    tol   = base(dtype) * (1 + eps(compute) / eps(dtype) * |mean(x)| / std(x)),   base = K_TOL * eps(dtype)

The first term of the tolerance is rounding to the dtype; the second is the cost of x - mean in the precision the
arithmetic runs in (float32 for float16/bfloat16): about eps * |x| / std in the normalized output.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
K_TOL = 16  # default tolerance: 16 units of roundoff of the dtype, times the input's magnitude factor


def rel_err(a: Tensor | None, ref: Tensor | None) -> float | None:
    """max |a - ref| / max |ref| in float64, on ref's device (a is copied there: the oracle's values live on the CPU);
    inf if a has a non-finite value where ref does not."""
    if a is None or ref is None:
        return None
    ref = ref.detach().to(torch.float64)
    a = a.detach().to(device=ref.device, dtype=torch.float64)
    if not torch.isfinite(a).all():
        return math.inf
    scale = ref.abs().max().item()
    err = (a - ref).abs().max().item()
    return err / scale if scale > 0 else err


def rel_err_reshaped(a: Tensor | None, ref: Tensor | None) -> float | None:
    """rel_err of `a` viewed in ref's shape (a user's layer may return its gradients in another shape); inf when the
    sizes differ."""
    if a is None or ref is None:
        return None
    if a.numel() != ref.numel():
        return math.inf
    return rel_err(a.reshape(ref.shape), ref)


def worst(values) -> float | None:
    """The largest of the errors that were measured (None ones were not); None when none was."""
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None


def default_tolerance(dtype: str) -> float:
    """base(dtype): K_TOL units of roundoff of the dtype named (float32, float64, float16, bfloat16)."""
    return K_TOL * torch.finfo(DTYPES[dtype]).eps


def tolerance(base: float, x: Tensor) -> float:
    """The case's tolerance for input x: base * (1 + eps(compute)/eps(dtype) * |mean(x)| / std(x))."""
    x64 = x.detach().to(torch.float64)
    std = x64.std().item() if x64.numel() > 1 else 0.0
    # float16/bfloat16 arithmetic runs in float32 (torch's CPU kernels and the zoo alike)
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    ratio = torch.finfo(compute).eps / torch.finfo(x.dtype).eps
    return base * (1.0 + ratio * (abs(x64.mean().item()) / std if std > 0 else 0.0))
