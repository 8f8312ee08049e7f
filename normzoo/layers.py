"""The nn.Module families: thin specs over normzoo.functional (and so over the one engine).

Constructor arguments, defaults, attribute names and state_dict keys follow torch.nn, so checkpoints load in both
directions. Extra keyword-only arguments: `compile` (default True: Inductor-compiled kernels; also see
NORMZOO_COMPILE) and `activation` (None, "silu", "relu", "gelu", "gelu_tanh": fused after the affine).
"""

from __future__ import annotations

import functools
import numbers

import torch
from torch import Tensor, nn

from . import functional as NF
from . import native, policy

__all__ = [
    "GroupNorm", "LayerNorm", "RMSNorm", "LayerNorm2d", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
]


def _as_shape(normalized_shape) -> tuple[int, ...]:
    """torch.nn's normalized_shape: an int or a sequence of ints, as a tuple."""
    if isinstance(normalized_shape, numbers.Integral):
        normalized_shape = (normalized_shape,)
    return tuple(int(s) for s in normalized_shape)


def _fast_forward(forward):
    """A layer's forward that first asks the layer's fast path (normzoo.native): a call whose exact signature store
    kernels served before runs them with no Python past this point. A miss takes `forward`, the Python way, which
    teaches the fast path what served it (normzoo.policy). A call's kernel depends on nothing but the layer's
    settings and mode (any change of which drops the fast path, see _Extras.__setattr__) and the signatures the fast
    path checks: the input's, the parameters' and those of the running statistics a BatchNorm in eval reads. A call
    that updates running statistics (BatchNorm training that tracks them) takes the Python way: `_fast_buffers`."""

    @functools.wraps(forward)
    def fast_forward(self, input: Tensor) -> Tensor:
        fast = None
        if not torch.compiler.is_compiling():
            fast = self.__dict__.get("_fast_path")
            if fast is None:
                fast = native.fast_path()
                if fast is not None:
                    self.__dict__["_fast_path"] = fast
                    self.__dict__["_plain_affine"] = _plain_affine(type(self))
        # (torch.func transforms and forward-mode tangents: the fast path itself declines them, in C++)
        if fast is None or input.__class__ is not Tensor or policy._recording is not None:
            return forward(self, input)
        buffers = self._fast_buffers()
        if buffers is None:
            return forward(self, input)
        params = self._parameters
        if self.__dict__.get("_plain_affine") and "weight" in params and (not self._has_bias or "bias" in params):
            # nn.Module.__getattr__ takes ~0.6 us an attribute (the two: 5-8% of a small input's call); where no class
            # attribute (a parametrization's property) could answer first, _parameters holds what it would return
            y = fast(input, params["weight"], params["bias"] if self._has_bias else None, *buffers)
        else:
            y = fast(input, self.weight, self.bias if self._has_bias else None, *buffers)
        if y is not None:
            return y
        policy.learning.call = (fast, input)
        try:
            return forward(self, input)
        finally:
            policy.learning.call = None

    return fast_forward


def _plain_affine(cls) -> bool:
    """Whether no class in cls's MRO defines weight or bias (as torch.nn.utils.parametrize's property does), so
    that self.weight and self.bias are what nn.Module.__getattr__ finds in _parameters. A class change (how a
    parametrization is added) goes through __setattr__, which drops the fast path and this answer with it."""
    return not any(name in c.__dict__ for c in cls.__mro__ for name in ("weight", "bias"))


class _Extras:
    """The keyword-only extensions every family shares, and torch.nn's affine parameters."""

    compile: bool
    activation: str | None
    _has_bias = True  # RMSNorm has none at all

    def __setattr__(self, name: str, value) -> None:
        # any setting, parameter or mode may change the kernel a call takes: the fast path relearns
        self.__dict__.pop("_fast_path", None)
        self.__dict__.pop("_plain_affine", None)
        super().__setattr__(name, value)

    def __getstate__(self):
        state = super().__getstate__()  # a copy, pickled or deep-copied without the fast path (a C++ object)
        state.pop("_fast_path", None)
        state.pop("_plain_affine", None)
        return state

    def _fast_buffers(self) -> tuple | None:
        """The running statistics a call reads, as the fast path takes them (none here), or None: this call takes
        the Python way."""
        return ()

    def _init_extras(self, compile: bool, activation: str | None) -> None:
        NF._check_activation(activation)
        self.compile = bool(compile)
        self.activation = activation

    def _extras_repr(self) -> str:
        out = "" if self.compile else ", compile=False"
        return out + (f", activation={self.activation!r}" if self.activation else "")

    def _init_affine(self, shape, weight: bool, bias: bool | None, device, dtype) -> None:
        """Parameters `weight` and `bias` of `shape` where learned, registered as None where not (torch.nn's names);
        bias=None: the family has no bias at all (RMSNorm)."""
        learned = {"weight": weight} if bias is None else {"weight": weight, "bias": weight and bias}
        for name, learn in learned.items():
            if learn:
                setattr(self, name, nn.Parameter(torch.empty(shape, device=device, dtype=dtype)))
            else:
                self.register_parameter(name, None)

    def _reset_affine(self) -> None:
        """torch.nn's initial affine: weight ones, bias zeros (those that exist)."""
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if getattr(self, "bias", None) is not None:
            nn.init.zeros_(self.bias)


class GroupNorm(_Extras, nn.Module):
    r"""Group Normalization (Wu and He, 2018), a drop-in for :class:`torch.nn.GroupNorm`.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    Mean and *biased* variance are taken per sample over each group of ``num_channels / num_groups`` channels and
    all spatial positions; :math:`\gamma, \beta` are per channel. No running statistics: train and eval agree.
    ``num_groups=1`` takes statistics over (C, *spatial) like LayerNorm but keeps a per-channel affine;
    ``num_groups=num_channels`` is InstanceNorm with an affine.

    Args:
        num_groups: number of groups. Give either this or ``group_size``.
        num_channels: C, must be divisible by the number of groups.
        eps: added to the variance. Default: 1e-5
        affine: learnable per-channel weight (ones) and bias (zeros). Default: True
        bias: learn the bias too (with ``affine``; keyword only, as torch.nn). Default: True
        group_size: channels per group, in place of ``num_groups`` (keyword only).
        compile: run Inductor-compiled kernels. Default: True
        activation: fuse ``"silu"``, ``"relu"``, ``"gelu"`` or ``"gelu_tanh"`` after the affine. Default: None

    Shape:
        - Input: :math:`(N, C, *)`
        - Output: :math:`(N, C, *)` (same shape and memory format as the input)

    Example::

        >>> m = normzoo.GroupNorm(32, 64)
        >>> y = m(torch.randn(8, 64, 56, 56))
    """

    num_groups: int
    num_channels: int
    eps: float
    affine: bool

    def __init__(self, num_groups: int | None = None, num_channels: int | None = None, eps: float = 1e-5,
                 affine: bool = True, device=None, dtype=None, *, bias: bool = True, group_size: int | None = None,
                 compile: bool = True, activation: str | None = None) -> None:
        # num_groups and num_channels default to None only so that group_size= can replace num_groups: leaving
        # out both is the TypeError torch.nn.GroupNorm raises for a missing argument.
        super().__init__()
        if num_channels is None:
            raise TypeError("GroupNorm needs num_channels")
        if num_groups is None and group_size is None:
            raise TypeError("GroupNorm needs num_groups (or group_size)")
        if num_groups is not None and group_size is not None:
            raise ValueError(f"GroupNorm takes exactly one of num_groups and group_size, "
                             f"got num_groups={num_groups}, group_size={group_size}")
        if group_size is not None:
            if group_size <= 0 or num_channels % group_size != 0:
                raise ValueError(f"num_channels ({num_channels}) must be divisible by group_size ({group_size})")
            num_groups = num_channels // group_size
        if num_groups <= 0 or num_channels % num_groups != 0:
            raise ValueError(f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups})")
        self.num_groups, self.num_channels, self.eps, self.affine = num_groups, num_channels, eps, affine
        self._init_extras(compile, activation)
        self._init_affine(num_channels, affine, bias, device, dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self._reset_affine()

    @_fast_forward
    def forward(self, input: Tensor) -> Tensor:
        if input.dim() < 2 or input.shape[1] != self.num_channels:
            raise ValueError(f"{type(self).__name__}({self.num_groups}, {self.num_channels}) expects input of shape "
                             f"(N, {self.num_channels}, *), got {tuple(input.shape)}")
        return NF.group_norm(input, self.num_groups, self.weight, self.bias, self.eps,
                             activation=self.activation, compile=self.compile)

    def extra_repr(self) -> str:
        return (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
                f"bias={self.bias is not None}" + self._extras_repr())


class LayerNorm(_Extras, nn.Module):
    r"""Layer Normalization (Ba et al., 2016), a drop-in for :class:`torch.nn.LayerNorm`.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    Mean and biased variance over the trailing ``len(normalized_shape)`` dims of each row; :math:`\gamma, \beta`
    have shape ``normalized_shape`` (one per element, not per channel: that is what sets it apart from
    ``GroupNorm(1, C)``). LayerNorm over the last dim of (N, L, D) is GroupNorm with one group on the (N*L, D)
    view. No running statistics.

    Args:
        normalized_shape: int or tuple, the trailing dims to normalize over.
        eps: added to the variance. Default: 1e-5
        elementwise_affine: learnable weight (ones) and, if ``bias``, bias (zeros). Default: True
        bias: learn a bias too (with ``elementwise_affine``). Default: True
        compile, activation: as for :class:`normzoo.GroupNorm`.

    Shape:
        - Input: :math:`(*, \text{normalized\_shape})`
        - Output: same as the input

    Example::

        >>> m = normzoo.LayerNorm(768)
        >>> y = m(torch.randn(8, 197, 768))
    """

    normalized_shape: tuple[int, ...]
    eps: float
    elementwise_affine: bool

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None, *, compile: bool = True, activation: str | None = None) -> None:
        super().__init__()
        self.normalized_shape = _as_shape(normalized_shape)
        self.eps, self.elementwise_affine = eps, elementwise_affine
        self._init_extras(compile, activation)
        self._init_affine(self.normalized_shape, elementwise_affine, bias, device, dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self._reset_affine()

    @_fast_forward
    def forward(self, input: Tensor) -> Tensor:
        return NF.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps,
                             activation=self.activation, compile=self.compile)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
                f"bias={self.bias is not None}" + self._extras_repr())


class RMSNorm(_Extras, nn.Module):
    r"""Root Mean Square Layer Normalization (Zhang and Sennrich, 2019), a drop-in for :class:`torch.nn.RMSNorm`.

    .. math::
        y = \frac{x}{\sqrt{\mathrm{E}[x^2] + \epsilon}} * \gamma

    The mean square is taken over the trailing ``len(normalized_shape)`` dims of each row. Nothing is subtracted
    (LayerNorm without centring) and there is no bias; :math:`\gamma` has shape ``normalized_shape``. A sum of
    squares has no cancellation, so inputs with a large mean lose nothing. No running statistics.

    Args:
        normalized_shape: int or tuple, the trailing dims to normalize over.
        eps: added to the mean square. Default: None, which means ``torch.finfo(t).eps`` of the dtype ``t`` the
            arithmetic runs in: the input's for float32/float64, float32's for float16/bfloat16. That is what
            torch.nn.RMSNorm computes (its docstring says the input's dtype; its kernels use float32's).
        elementwise_affine: learnable weight (ones). Default: True
        compile, activation: as for :class:`normzoo.GroupNorm`.

    Shape:
        - Input: :math:`(*, \text{normalized\_shape})`
        - Output: same as the input

    Example::

        >>> m = normzoo.RMSNorm(4096)
        >>> y = m(torch.randn(4, 512, 4096))
    """

    normalized_shape: tuple[int, ...]
    eps: float | None
    elementwise_affine: bool

    _has_bias = False

    def __init__(self, normalized_shape, eps: float | None = None, elementwise_affine: bool = True, device=None,
                 dtype=None, *, compile: bool = True, activation: str | None = None) -> None:
        super().__init__()
        self.normalized_shape = _as_shape(normalized_shape)
        self.eps, self.elementwise_affine = eps, elementwise_affine
        self._init_extras(compile, activation)
        self._init_affine(self.normalized_shape, elementwise_affine, None, device, dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self._reset_affine()

    @_fast_forward
    def forward(self, input: Tensor) -> Tensor:
        return NF.rms_norm(input, self.normalized_shape, self.weight, self.eps, activation=self.activation,
                           compile=self.compile)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
                + self._extras_repr())


class LayerNorm2d(_Extras, nn.Module):
    r"""Channels-first Layer Normalization: over the C channels at each position of an (N, C, *) input.

    .. math::
        y_{n,:,p} = \frac{x_{n,:,p} - \mathrm{E}_c[x_{n,c,p}]}{\sqrt{\mathrm{Var}_c[x_{n,c,p}] + \epsilon}}
        * \gamma + \beta

    for every sample :math:`n` and spatial position :math:`p`, with the *biased* variance over the channels and
    :math:`\gamma, \beta` per channel: the LayerNorm of ConvNeXt, SAM and ViTDet. It computes what
    ``F.layer_norm(x.permute(0, 2, 3, 1), (C,), weight, bias, eps).permute(0, 3, 1, 2)`` computes, but reduces dim 1
    in place, so neither memory format is copied, and the output keeps the input's memory format. Attribute and
    state_dict names (``weight``, ``bias``) are timm's ``LayerNorm2d``'s, so its checkpoints load both ways.
    Statistics per (sample, position): not :class:`normzoo.GroupNorm` ``(1, C)``, which takes them over (C, H, W).

    Args:
        num_channels: C, the channels at dim 1.
        eps: added to the variance. Default: 1e-6 (timm's and ConvNeXt's; torch.nn.LayerNorm's is 1e-5)
        affine: learnable per-channel weight (ones) and bias (zeros). Default: True
        compile, activation: as for :class:`normzoo.GroupNorm`.

    Shape:
        - Input: :math:`(N, C, *)`
        - Output: :math:`(N, C, *)` (same shape and memory format as the input)

    Example::

        >>> m = normzoo.LayerNorm2d(96)
        >>> y = m(torch.randn(8, 96, 56, 56).to(memory_format=torch.channels_last))
    """

    num_channels: int
    eps: float
    affine: bool

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True, device=None, dtype=None, *,
                 compile: bool = True, activation: str | None = None) -> None:
        super().__init__()
        self.num_channels, self.eps, self.affine = num_channels, eps, affine
        self._init_extras(compile, activation)
        self._init_affine(num_channels, affine, True, device, dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self._reset_affine()

    @_fast_forward
    def forward(self, input: Tensor) -> Tensor:
        if input.dim() < 2 or input.shape[1] != self.num_channels:
            raise ValueError(f"LayerNorm2d({self.num_channels}) expects input of shape (N, {self.num_channels}, *), "
                             f"got {tuple(input.shape)}")
        return NF.layer_norm2d(input, self.weight, self.bias, self.eps, activation=self.activation,
                               compile=self.compile)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, affine={self.affine}" + self._extras_repr()


class _ChannelNorm(_Extras, nn.Module):
    """Shared by InstanceNorm*d and BatchNorm*d: torch.nn's _NormBase arguments, parameters and buffers.

    Subclasses set `input_dims` (the numbers of dims taken) and `unbatched_dims` (the number of dims that means
    "no batch dim", or None).
    """

    input_dims: tuple[int, ...]
    unbatched_dims: int | None = None
    _version = 2  # torch.nn's _NormBase state_dict version: num_batches_tracked exists
    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True,
                 compile: bool = True, activation: str | None = None) -> None:
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        self._init_extras(compile, activation)
        self._init_affine(num_features, affine, bias, device, dtype)
        factory_kwargs = {"device": device, "dtype": dtype}
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory_kwargs))
            self.register_buffer("running_var", torch.ones(num_features, **factory_kwargs))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        self._reset_affine()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # Checkpoints from before num_batches_tracked existed (torch.nn's version < 2) start the count at 0.
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _check_input(self, input: Tensor) -> bool:
        """Validate dims and channels; return True when the input has no batch dim."""
        if input.dim() not in self.input_dims:
            want = " or ".join(f"{d}D" for d in self.input_dims)
            raise ValueError(f"{type(self).__name__} expects a {want} input, got shape {tuple(input.shape)}")
        no_batch = input.dim() == self.unbatched_dims
        channel_dim = 0 if no_batch else 1
        if input.shape[channel_dim] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}) expects {self.num_features} channels at "
                             f"dim {channel_dim}, got input of shape {tuple(input.shape)}")
        return no_batch

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}"
                + self._extras_repr())


class _InstanceNorm(_ChannelNorm):
    r"""Instance Normalization (Ulyanov et al., 2016), a drop-in for torch.nn.InstanceNorm{1,2,3}d.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    Mean and biased variance per sample and channel over the spatial dims: GroupNorm with one channel per group.
    No running statistics in normzoo (``track_running_stats=True`` raises: use BatchNorm for those), so train and
    eval agree. ``affine`` defaults to False, as in torch.nn.

    Shape:
        - Input: :math:`(N, C, *spatial)` or :math:`(C, *spatial)`
        - Output: same as the input

    Example::

        >>> m = normzoo.InstanceNorm2d(64, affine=True)
        >>> y = m(torch.randn(4, 64, 32, 32))
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = False,
                 track_running_stats: bool = False, device=None, dtype=None, *, bias: bool = True,
                 compile: bool = True, activation: str | None = None) -> None:
        if track_running_stats:
            raise ValueError(f"{type(self).__name__}(track_running_stats=True) is not supported: in normzoo only "
                             f"BatchNorm keeps running statistics; use normzoo.{type(self).__name__.replace('Instance', 'Batch')}")
        super().__init__(num_features, eps, momentum, affine, False, device, dtype, bias=bias, compile=compile,
                         activation=activation)

    @_fast_forward
    def forward(self, input: Tensor) -> Tensor:
        no_batch = self._check_input(input)
        x = input.unsqueeze(0) if no_batch else input
        y = NF.instance_norm(x, None, None, self.weight, self.bias, True, 0.1, self.eps,
                             activation=self.activation, compile=self.compile)
        return y.squeeze(0) if no_batch else y


class _BatchNorm(_ChannelNorm):
    r"""Batch Normalization (Ioffe and Szegedy, 2015), a drop-in for torch.nn.BatchNorm{1,2,3}d.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    In training, mean and biased variance per channel over the batch and spatial dims, and (with
    ``track_running_stats``) running estimates updated as
    :math:`\hat{x}_{new} = (1 - \text{momentum}) \hat{x} + \text{momentum}\, x_t` with the *unbiased* batch
    variance; ``momentum=None`` gives the cumulative average over ``num_batches_tracked`` batches. In eval the
    running estimates are used, unless ``track_running_stats=False``, in which case batch statistics are.

    Shape:
        - Input: :math:`(N, C)` or :math:`(N, C, L)` for 1d, :math:`(N, C, H, W)` for 2d,
          :math:`(N, C, D, H, W)` for 3d
        - Output: same as the input

    Example::

        >>> m = normzoo.BatchNorm2d(64)
        >>> y = m(torch.randn(8, 64, 56, 56))
    """

    def _fast_buffers(self) -> tuple | None:
        if self.training:  # training that tracks running statistics updates them: the Python way
            return None if self.track_running_stats else (None, None)
        buffers = self._buffers  # eval: the running statistics (None without them: the batch's)
        return buffers.get("running_mean"), buffers.get("running_var")

    @_fast_forward
    def forward(self, input: Tensor) -> Tensor:
        self._check_input(input)
        momentum = self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if momentum is None:  # cumulative moving average, kept as a tensor so nothing syncs or breaks a graph
                momentum = 1.0 / self.num_batches_tracked.to(torch.float64)
        use_batch_stats = self.training or self.running_mean is None
        use_buffers = not self.training or self.track_running_stats
        return NF.batch_norm(
            input,
            self.running_mean if use_buffers else None,
            self.running_var if use_buffers else None,
            self.weight, self.bias, use_batch_stats, momentum if momentum is not None else 0.0, self.eps,
            activation=self.activation, compile=self.compile,
        )


class InstanceNorm1d(_InstanceNorm):
    __doc__ = _InstanceNorm.__doc__.replace("{1,2,3}d", "1d")
    input_dims, unbatched_dims = (2, 3), 2


class InstanceNorm2d(_InstanceNorm):
    __doc__ = _InstanceNorm.__doc__.replace("{1,2,3}d", "2d")
    input_dims, unbatched_dims = (3, 4), 3


class InstanceNorm3d(_InstanceNorm):
    __doc__ = _InstanceNorm.__doc__.replace("{1,2,3}d", "3d")
    input_dims, unbatched_dims = (4, 5), 4


class BatchNorm1d(_BatchNorm):
    __doc__ = _BatchNorm.__doc__.replace("{1,2,3}d", "1d")
    input_dims = (2, 3)


class BatchNorm2d(_BatchNorm):
    __doc__ = _BatchNorm.__doc__.replace("{1,2,3}d", "2d")
    input_dims = (4,)


class BatchNorm3d(_BatchNorm):
    __doc__ = _BatchNorm.__doc__.replace("{1,2,3}d", "3d")
    input_dims = (5,)
