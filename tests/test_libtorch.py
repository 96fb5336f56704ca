"""deepImageJ's libtorch 2.0: TorchScript operators checked against torch 2.0.1's, traced+frozen fallback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tilenorm_bmz.bmz.libtorch import LIBTORCH_REFERENCE, known_operators, missing_operators
from tilenorm_bmz.bmz.weights import write_torchscript
from tilenorm_bmz.models import UNet

THIRDPARTY = Path(__file__).parent / "fixtures" / "thirdparty"


class InterpolatingNet(nn.Module):
    """A third-party style 2D network that upsamples with ``F.interpolate`` (as torch-em's U-Nets do)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(1, 4, 3, padding=1)
        self.out = nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = torch.relu(self.down(x))
        up = F.interpolate(F.max_pool2d(e, 2), scale_factor=2.0, mode="bilinear", align_corners=False)
        return torch.sigmoid(self.out(torch.cat([e, up], dim=1)))


def test_the_reference_is_libtorch_2_0_1() -> None:
    ops = known_operators()
    assert LIBTORCH_REFERENCE == "2.0.1"
    assert 4000 < len(ops) < 5000  # 4240 schemas in torch 2.0.1 (PROVENANCE.md)
    assert {"aten::conv3d", "aten::conv_transpose2d.input", "aten::upsample_bilinear2d.vec"} <= ops
    assert not any(op.startswith("aten::_upsample_lanczos2d_aa") for op in ops)  # added after 2.0


def test_a_scripted_interpolate_needs_an_operator_libtorch_2_0_lacks_a_traced_one_does_not() -> None:
    net = InterpolatingNet().eval()
    assert missing_operators(torch.jit.script(net)) == ["aten::_upsample_lanczos2d_aa.vec"]
    traced = torch.jit.freeze(torch.jit.trace(net, torch.rand(1, 1, 32, 32)))
    assert missing_operators(traced) == []


def test_export_falls_back_to_traced_and_frozen_torchscript_equal_at_every_size(tmp_path: Path) -> None:
    net = InterpolatingNet().eval()
    sizes = [(32, 32), (48, 64), (96, 80)]
    path, deviation = write_torchscript(net, tmp_path / "w.pt", 1, sizes)
    assert missing_operators(path) == []
    loaded = torch.jit.load(str(path))
    assert not hasattr(loaded, "down")  # frozen: submodules inlined (a scripted file keeps them)
    for shape in [(1, 1, 40, 56), (2, 1, 128, 128)]:  # sizes the check did not use
        x = torch.rand(shape)
        with torch.no_grad():
            assert torch.allclose(loaded(x), net(x), atol=1e-6)
    assert deviation < 1e-5


def test_export_keeps_the_scripted_torchscript_when_it_is_compatible(tmp_path: Path) -> None:
    net = UNet(dims=2, in_channels=1, out_channels=2, depth=2, features=4, norm="batchnorm").eval()
    path, _ = write_torchscript(net, tmp_path / "w.pt", 1, [(32, 32), (48, 48)])
    assert missing_operators(path) == []
    assert hasattr(torch.jit.load(str(path)), "encoders")  # scripted: every size works, not traced


@pytest.mark.bmz
def test_compatibility_report_names_the_operators_deepimagej_cannot_load(tmp_path: Path) -> None:
    """A third-party package (bioimageio.spec's builder, TorchScript only) and the same with scripted weights."""
    from bioimageio.spec import load_model_description, save_bioimageio_package
    from bioimageio.spec.model.v0_5 import TorchscriptWeightsDescr

    from tilenorm_bmz.bmz import check_compatibility

    source = THIRDPARTY / "fixed256_torchscript.zip"
    check = _torchscript_check(check_compatibility(source))
    assert check.status == "pass", check

    # the same package with a scripted network that upsamples with interpolate: deepImageJ cannot load it
    scripted = tmp_path / "scripted.pt"
    torch.jit.script(InterpolatingNet().eval()).save(str(scripted))
    descr = load_model_description(source, perform_io_checks=False)
    old = descr.weights.torchscript
    descr.weights.torchscript = TorchscriptWeightsDescr(source=scripted, pytorch_version=old.pytorch_version)
    out = save_bioimageio_package(descr, output_path=tmp_path / "scripted.zip")
    check = _torchscript_check(check_compatibility(out))
    assert check.status == "fail" and "aten::_upsample_lanczos2d_aa.vec" in check.detail and check.fix
    assert source.read_bytes() == (THIRDPARTY / "fixed256_torchscript.zip").read_bytes()


def _torchscript_check(report):
    (check,) = [c for c in report.checks if c.consumer == "deepimagej" and "libtorch" in c.name]
    return check


def test_the_reference_list_ships_with_the_package() -> None:
    from importlib import resources

    data = resources.files("tilenorm_bmz.bmz").joinpath("data")
    names = {p.name for p in data.iterdir()}
    assert {"libtorch-2.0.1-schemas.txt.gz", "libtorch-2.0.1-schemas.PROVENANCE.md"} <= names
