"""Stand-ins of common GroupNorm mistakes, each one line away from right; `normzoo check` names each one.

    normzoo check examples/norm_mistakes.py:EpsOutsideSqrt --like gn8 --init '8, 16'
    normzoo check examples/norm_mistakes.py:PerChannelStats --like gn8 --init '8, 16'
    normzoo check examples/norm_mistakes.py:OnePassVariance --like gn8 --init '8, 16'
    normzoo check examples/norm_mistakes.py:PerElementAffine --like gn1 --init '16, (8, 8)'
"""

import torch
from torch import nn


class _GroupNormBase(nn.Module):
    def __init__(self, num_groups, num_channels, eps=1e-5):
        super().__init__()
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, eps
        self.gamma = nn.Parameter(torch.ones(num_channels))  # names other than weight/bias: bound by name alias
        self.beta = nn.Parameter(torch.zeros(num_channels))

    def affine(self, y):
        shape = (1, -1) + (1,) * (y.dim() - 2)
        return y * self.gamma.view(shape) + self.beta.view(shape)


class EpsOutsideSqrt(_GroupNormBase):
    def forward(self, x):
        xg = x.reshape(x.shape[0], self.num_groups, -1)
        mean = xg.mean(-1, keepdim=True)
        std = xg.std(-1, unbiased=False, keepdim=True)
        return self.affine(((xg - mean) / (std + self.eps)).reshape(x.shape))  # eps outside the sqrt


class PerChannelStats(_GroupNormBase):
    def forward(self, x):
        dims = tuple(range(2, x.dim()))  # per channel: the group's other channels are left out
        mean = x.mean(dims, keepdim=True)
        var = x.var(dims, unbiased=False, keepdim=True)
        return self.affine((x - mean) / torch.sqrt(var + self.eps))


class OnePassVariance(_GroupNormBase):
    def forward(self, x):
        xg = x.reshape(x.shape[0], self.num_groups, -1)
        mean = xg.mean(-1, keepdim=True)
        var = (xg * xg).mean(-1, keepdim=True) - mean * mean  # E[x^2] - E[x]^2, unshifted: cancels at large means
        return self.affine(((xg - mean) / torch.sqrt(var.clamp_min(0) + self.eps)).reshape(x.shape))


class PerElementAffine(nn.Module):
    """LayerNorm([C, H, W]) written where GroupNorm(1, C) was meant."""

    def __init__(self, num_channels, spatial, eps=1e-5):
        super().__init__()
        self.norm = nn.LayerNorm((num_channels, *spatial), eps=eps)

    def forward(self, x):
        return self.norm(x)
