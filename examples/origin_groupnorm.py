"""normzoo's origin: a GroupNorm written from the paper's Figure 3, and the fix.

    normzoo check examples/origin_groupnorm.py:OriginalGroupNorm --like gn1 --init '1, 3, affine=False'
    normzoo check examples/origin_groupnorm.py:FixedGroupNorm --like gn1 --init '1, 3, affine=False'

The original was off by about 1e-2 against torch.nn.GroupNorm and its author suspected a running average inside
torch's GroupNorm. There is none: GroupNorm normalizes each sample by the biased variance (divide by n) of its
group, and keeps no state. The original used the unbiased variance (torch.var's default) and blended a running
average (momentum 1e-4) into the statistics it normalized with. The fixed one is within float32 rounding of torch.
"""

import torch
from torch import nn


class OriginalGroupNorm(nn.Module):
    """The layer as first written: unbiased variance, and a running average used in forward."""

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, momentum=1e-4):
        super().__init__()
        self.num_groups, self.num_channels, self.eps, self.momentum = num_groups, num_channels, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_channels)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_channels)) if affine else None
        self.register_buffer("running_mean", torch.zeros(num_groups))
        self.register_buffer("running_var", torch.ones(num_groups))

    def forward(self, x):
        n, c = x.shape[:2]
        xg = x.reshape(n, self.num_groups, -1)
        mean = xg.mean(-1, keepdim=True)
        var = xg.var(-1, keepdim=True)  # mistake 1: unbiased (divides by n - 1)
        if self.training:  # mistake 2: a running average, and it enters the statistics used below
            with torch.no_grad():
                m = self.momentum
                self.running_mean.mul_(1 - m).add_(m * mean.mean(0).squeeze(-1))
                self.running_var.mul_(1 - m).add_(m * var.mean(0).squeeze(-1))
        m = self.momentum
        mean = (1 - m) * mean + m * self.running_mean.view(1, -1, 1)
        var = (1 - m) * var + m * self.running_var.view(1, -1, 1)
        y = ((xg - mean) / torch.sqrt(var + self.eps)).reshape(x.shape)
        if self.weight is not None:
            shape = (1, c) + (1,) * (x.dim() - 2)
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


class FixedGroupNorm(nn.Module):
    """The same layer fixed: biased variance, no state."""

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True):
        super().__init__()
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, eps
        self.weight = nn.Parameter(torch.ones(num_channels)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_channels)) if affine else None

    def forward(self, x):
        n, c = x.shape[:2]
        xg = x.reshape(n, self.num_groups, -1)
        mean = xg.mean(-1, keepdim=True)
        var = ((xg - mean) ** 2).mean(-1, keepdim=True)  # biased: divide by n
        y = ((xg - mean) / torch.sqrt(var + self.eps)).reshape(x.shape)
        if self.weight is not None:
            shape = (1, c) + (1,) * (x.dim() - 2)
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y
