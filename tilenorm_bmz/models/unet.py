"""A plain 2D/3D U-Net with a choice of feature normalization.

This file imports only ``torch`` (BatchRenorm is imported lazily, only when ``norm="batchrenorm"``) so
that it can be shipped verbatim as the architecture source of a bioimage.io package, where the network
is exported with ``norm="batchnorm"`` (every BatchRenorm replaced by the equal BatchNorm).

Architecture (paper setting: ``depth=2``, ``features=32`` -> 32/64/128 channels)::

    level i (encoder): [conv3 -> norm -> ReLU] x 2, then max-pool by pool_factors[i]
    bottleneck:        [conv3 -> norm -> ReLU] x 2
    level i (decoder): transposed conv (kernel = stride = pool_factors[i]), concat skip,
                       [conv3 -> norm -> ReLU] x 2
    head:              conv1 -> sigmoid | softmax | none

Convolutions are zero-padded ("same"), so the output has the input's spatial size, which must be a
multiple of :attr:`UNet.divisor` along every axis.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["NORM_KINDS", "UNet", "make_norm"]

# The names of tilenorm_bmz.config.NormKind (the definition). Spelled out here because this file ships
# verbatim, importing only torch, as the architecture of packages; a test checks that the two agree.
NORM_KINDS = ("batchrenorm", "batchnorm", "instancenorm", "groupnorm", "none")
_ACTIVATIONS = ("sigmoid", "softmax", "none")


def _parse_norm(norm: str | Mapping[str, Any] | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"kind": "batchrenorm", "momentum": 0.01, "eps": 1e-5, "groups": 8}
    if norm is None:
        spec["kind"] = "none"
    elif isinstance(norm, str):
        spec["kind"] = norm
    elif isinstance(norm, Mapping):
        unknown = set(norm) - set(spec)
        if unknown:
            raise ValueError(f"unknown norm option(s) {sorted(unknown)}; valid: {sorted(spec)}")
        spec.update(norm)
    else:  # a NormConfig or any object with the same attributes
        spec.update({k: getattr(norm, k) for k in spec if hasattr(norm, k)})
    if spec["kind"] not in NORM_KINDS:
        raise ValueError(f"norm must be one of {', '.join(NORM_KINDS)}; got {spec['kind']!r}")
    return spec


def make_norm(spec: Mapping[str, Any], channels: int, dims: int) -> nn.Module:
    """Build the normalization layer named by ``spec["kind"]`` for ``channels`` channels."""
    kind = spec["kind"]
    if kind == "batchrenorm":
        from tilenorm_bmz.norm.batchrenorm import BatchRenorm  # lazy: keeps this file torch-only

        return BatchRenorm(channels, dims=dims, eps=spec["eps"], momentum=spec["momentum"])
    if kind == "batchnorm":
        cls = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        return cls(channels, eps=spec["eps"], momentum=spec["momentum"])
    if kind == "instancenorm":
        cls = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dims]
        return cls(channels, eps=spec["eps"], affine=True, track_running_stats=False)
    if kind == "groupnorm":
        groups = min(int(spec["groups"]), channels)
        while channels % groups:
            groups -= 1
        return nn.GroupNorm(groups, channels, eps=spec["eps"], affine=True)
    return nn.Identity()


def _fx_tracing() -> bool:
    """True while ``torch.fx`` traces the network (tilenorm-bmz's inference rewrites)."""
    from torch.fx import _symbolic_trace as fx

    return bool(getattr(fx, "is_fx_symbolic_tracing", getattr(fx, "is_fx_tracing", lambda: False))())


class _ConvBlock(nn.Sequential):
    def __init__(self, dims: int, cin: int, cout: int, norm: Mapping[str, Any]) -> None:
        conv = {2: nn.Conv2d, 3: nn.Conv3d}[dims]
        bias = norm["kind"] == "none"
        layers: list[nn.Module] = []
        for i in range(2):
            layers += [
                conv(cin if i == 0 else cout, cout, kernel_size=3, padding=1, bias=bias),
                make_norm(norm, cout, dims),
                nn.ReLU(inplace=True),
            ]
        super().__init__(*layers)


class UNet(nn.Module):
    """2D/3D U-Net.

    Parameters
    ----------
    dims
        2 or 3 spatial dimensions.
    in_channels, out_channels
        Input and output channel counts.
    depth
        Number of downsamplings (the paper: 2).
    features
        Channels of the first level, doubled at every downsampling (the paper: 32 -> 32/64/128), or an
        explicit list of ``depth + 1`` channel counts.
    norm
        ``"batchrenorm"``, ``"batchnorm"``, ``"instancenorm"``, ``"groupnorm"`` or ``"none"``, or a mapping
        ``{"kind", "momentum", "eps", "groups"}``.
    pool_factors
        One pooling factor per downsampling, an int or a per-axis tuple such as ``(1, 2, 2)``; default 2.
    final_activation
        ``"sigmoid"``, ``"softmax"`` (over channels) or ``"none"``.

    Examples
    --------
    >>> net = UNet(dims=2, in_channels=1, out_channels=2, depth=2, features=8)
    >>> net.divisor
    (4, 4)
    >>> net(torch.zeros(1, 1, 64, 64)).shape
    torch.Size([1, 2, 64, 64])
    """

    __jit_unused_properties__ = ["divisor", "init_kwargs"]  # noqa: RUF012 - TorchScript reads it

    def __init__(
        self,
        dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        depth: int = 2,
        features: int | Sequence[int] = 32,
        norm: str | Mapping[str, Any] | None = "batchrenorm",
        pool_factors: Sequence[int | Sequence[int]] | None = None,
        final_activation: str = "sigmoid",
    ) -> None:
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {dims}")
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        if final_activation not in _ACTIVATIONS:
            raise ValueError(f"final_activation must be one of {_ACTIVATIONS}, got {final_activation!r}")
        if isinstance(features, int):
            feats = [int(features) * 2**i for i in range(depth + 1)]
        else:
            feats = [int(f) for f in features]
            if len(feats) != depth + 1:
                raise ValueError(f"features needs depth + 1 = {depth + 1} entries, got {len(feats)}")
        if pool_factors is None:
            pools = [(2,) * dims for _ in range(depth)]
        else:
            if len(pool_factors) != depth:
                raise ValueError(f"pool_factors needs {depth} entries (one per downsampling), got {len(pool_factors)}")
            pools = []
            for f in pool_factors:
                t = (int(f),) * dims if isinstance(f, int) else tuple(int(x) for x in f)
                if len(t) != dims or min(t) < 1:
                    raise ValueError(f"pool factor {f!r} must be a positive int or a tuple of {dims} ints")
                pools.append(t)
        norm_spec = _parse_norm(norm)
        self.dims = dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.depth = depth
        self.features = feats
        self.norm_kind = norm_spec["kind"]
        self.pool_factors = pools
        self.final_activation = final_activation
        self._init_kwargs = {
            "dims": dims,
            "in_channels": in_channels,
            "out_channels": out_channels,
            "depth": depth,
            "features": feats if not isinstance(features, int) else int(features),
            "norm": dict(norm_spec),
            "pool_factors": [list(p) for p in pools],
            "final_activation": final_activation,
        }

        pool_cls = {2: nn.MaxPool2d, 3: nn.MaxPool3d}[dims]
        up_cls = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]
        conv_cls = {2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.encoders = nn.ModuleList()
        self.pools = nn.ModuleList()
        cin = in_channels
        for i in range(depth):
            self.encoders.append(_ConvBlock(dims, cin, feats[i], norm_spec))
            self.pools.append(pool_cls(kernel_size=pools[i], stride=pools[i]))
            cin = feats[i]
        self.bottleneck = _ConvBlock(dims, cin, feats[depth], norm_spec)
        self.upsamplers = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for i in reversed(range(depth)):
            self.upsamplers.append(up_cls(feats[i + 1], feats[i], kernel_size=pools[i], stride=pools[i]))
            self.decoders.append(_ConvBlock(dims, 2 * feats[i], feats[i], norm_spec))
        self.head = conv_cls(feats[0], out_channels, kernel_size=1)
        if final_activation == "sigmoid":
            self.activation = nn.Sigmoid()
        elif final_activation == "softmax":
            self.activation = nn.Softmax(dim=1)
        else:
            self.activation = nn.Identity()  # type: ignore[assignment]

    # -- geometry -----------------------------------------------------------------------------------
    @property
    def divisor(self) -> tuple[int, ...]:
        """Every spatial input size must be a multiple of this (product of the pooling factors per axis)."""
        return tuple(math.prod(p[a] for p in self.pool_factors) for a in range(self.dims))

    @property
    def init_kwargs(self) -> dict[str, Any]:
        """The constructor arguments (JSON-serializable) that rebuild this architecture."""
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in self._init_kwargs.items()}

    @classmethod
    def from_config(cls, config: Any) -> UNet:
        """Build from a :class:`tilenorm_bmz.config.UNetConfig` (or its dict form)."""
        data = config.model_dump(mode="json") if hasattr(config, "model_dump") else dict(config)
        return cls(**data)

    def valid_size(self, size: int, axis: int = -1) -> tuple[int, int]:
        """The nearest valid sizes (below, above) for ``size`` along spatial ``axis``."""
        div = self.divisor[axis]
        lo = (size // div) * div
        return (lo if lo > 0 else div), (lo if lo == size else lo + div)

    @torch.jit.unused
    def check_input_shape(self, shape: Sequence[int]) -> None:
        """Raise a ``ValueError`` naming the valid sizes if ``shape`` (N, C, *spatial) does not fit."""
        if len(shape) != self.dims + 2:
            raise ValueError(
                f"UNet(dims={self.dims}) expects input of shape (N, C, {', '.join('ZYX'[3 - self.dims:])}), "
                f"got {tuple(shape)}"
            )
        if shape[1] != self.in_channels:
            raise ValueError(f"UNet expects {self.in_channels} input channel(s), got {shape[1]} (shape {tuple(shape)})")
        names = "ZYX"[3 - self.dims :]
        bad = []
        for a, (s, d) in enumerate(zip(shape[2:], self.divisor, strict=True)):
            if s % d:
                lo, hi = self.valid_size(int(s), a)
                bad.append(f"{names[a]}={s} (use {lo} or {hi}: a multiple of {d})")
        if bad:
            raise ValueError(
                "input size not divisible by the network's pooling factors: "
                + "; ".join(bad)
                + f". Valid sizes are multiples of {self.divisor} per axis (pad or crop the image)."
            )

    # -- forward ------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            if not _fx_tracing():  # symbolic shapes cannot be checked
                self.check_input_shape(x.shape)
        skips: list[Tensor] = []
        for enc, pool in zip(self.encoders, self.pools):  # noqa: B905 - TorchScript has no strict=
            x = enc(x)
            skips.append(x)
            x = pool(x)
        x = self.bottleneck(x)
        for up, dec in zip(self.upsamplers, self.decoders):  # noqa: B905
            # the skip and the upsampled tensor are only referenced by the concatenation: both are freed
            # before the decoder runs (a quarter less peak memory at full resolution)
            x = dec(torch.cat([skips.pop(), up(x)], dim=1))
        return self.activation(self.head(x))
