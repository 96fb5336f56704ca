"""Shared fixtures: tiny networks, synthetic images, and a guard against network access."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from tilenorm_bmz.models import UNet

# Rich sizes the CLI's tables and log lines from the terminal (80 columns when there is none); tests that read
# the CLI's output must not depend on the width of whatever runs them.
os.environ["COLUMNS"] = "160"

# Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine spinning OpenMP threads
# slow them down by 10x: the suite runs single-threaded.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest tests first (``heavy``): pytest-xdist hands tests out in collection order, so a long test
    collected last would run alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail the test on any attempt to open a network connection or resolve a host name."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield


def randomize_norm_stats(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every norm layer non-trivial affine parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            # norm layers' affine parameters (not e.g. PReLU's slope, which has a 1-d weight and no bias)
            if getattr(m, "weight", None) is not None and m.weight.dim() == 1 and getattr(m, "bias", None) is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.1)
    return model


@pytest.fixture
def tiny_unet_factory():
    """``make(dims, norm, **kw)`` -> a tiny UNet in eval mode with non-trivial norm statistics."""

    def make(dims: int = 2, norm: str = "batchrenorm", **kw) -> UNet:
        kw.setdefault("features", 4)
        kw.setdefault("depth", 2)
        net = UNet(dims=dims, norm=norm, **kw)
        return randomize_norm_stats(net).eval()

    return make
