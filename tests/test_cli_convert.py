"""`tilenorm-bmz convert` end to end through the CLI."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from tilenorm_bmz.checkpoint import load_checkpoint, save_checkpoint
from tilenorm_bmz.cli import app
from tilenorm_bmz.models import UNet
from tilenorm_bmz.norm import BatchRenorm

from .conftest import randomize_norm_stats

runner = CliRunner()

ARCH = textwrap.dedent(
    """
    import torch
    from torch import nn

    class SmallNet(nn.Module):
        def __init__(self, width=4):
            super().__init__()
            self.conv = nn.Conv2d(1, width, 3, padding=1)
            self.bn = nn.BatchNorm2d(width)
            self.gn = nn.GroupNorm(2, width)
            self.head = nn.Conv2d(width, 1, 1)

        def forward(self, x):
            return self.head(torch.relu(self.gn(self.bn(self.conv(x)))))
    """
)


def _output(result) -> str:
    return result.output  # stdout and stderr interleaved


@pytest.fixture
def arch_module(tmp_path, monkeypatch):
    (tmp_path / "cli_arch.py").write_text(ARCH)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    import sys

    sys.modules.pop("cli_arch", None)
    return importlib.import_module("cli_arch")


def test_convert_our_batchnorm_checkpoint(tmp_path) -> None:
    net = randomize_norm_stats(UNet(dims=2, features=4, norm="batchnorm")).eval()
    save_checkpoint(tmp_path / "bn.pt", net, input_normalization={"mode": "global"})
    result = runner.invoke(app, ["convert", str(tmp_path / "bn.pt"), "-o", str(tmp_path / "brn.pt"), "--show"])
    assert result.exit_code == 0, _output(result)
    assert "10 layer(s) converted to batchrenorm" in result.output
    model, info = load_checkpoint(tmp_path / "brn.pt")
    assert info.norm_kind == "batchrenorm"
    assert sum(isinstance(m, BatchRenorm) for m in model.modules()) == 10
    x = torch.randn(1, 1, 16, 16)
    assert torch.equal(model(x), net(x))
    assert info.extra["input_normalization"] == {"mode": "global"}  # carried over
    assert info.extra["source_kind"] == "checkpoint"


def test_convert_plain_state_dict_with_arch(tmp_path, arch_module) -> None:
    net = randomize_norm_stats(arch_module.SmallNet(width=4)).eval()
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    out = tmp_path / "out.pt"
    result = runner.invoke(app, ["convert", str(tmp_path / "sd.pt"), "--arch", "cli_arch:SmallNet",
                                 "--arch-kwargs", '{"width": 4}', "-o", str(out)])
    assert result.exit_code == 0, _output(result)
    assert "without running statistics" in result.output  # the GroupNorm
    model, info = load_checkpoint(out, trust_code=True)  # the user's --arch, now stored: code by name
    assert isinstance(model.bn, BatchRenorm) and isinstance(model.gn, BatchRenorm)
    assert info.architecture.norm_conversion == "batchrenorm"
    torch.testing.assert_close(model.bn.running_var, net.bn.running_var)


def test_convert_state_dict_with_arch_file(tmp_path) -> None:
    (tmp_path / "arch.py").write_text(ARCH)
    ns: dict = {}
    exec(compile(ARCH, "arch", "exec"), ns)
    torch.save({"state_dict": ns["SmallNet"]().state_dict()}, tmp_path / "sd.pt")
    result = runner.invoke(app, ["convert", str(tmp_path / "sd.pt"), "--arch-file", str(tmp_path / "arch.py"),
                                 "--arch-callable", "SmallNet", "-o", str(tmp_path / "o.pt")])
    assert result.exit_code == 0, _output(result)
    model, info = load_checkpoint(tmp_path / "o.pt", trust_code=True)
    assert info.architecture.kind == "source" and isinstance(model.gn, BatchRenorm)


def test_convert_torch_em_style_checkpoint(tmp_path, arch_module) -> None:
    net = arch_module.SmallNet(width=4)
    torch.save({"model_state": net.state_dict(), "iteration": 10,
                "init": {"model_class": "cli_arch.SmallNet", "model_kwargs": {"width": 4}}}, tmp_path / "best.pt")
    # the class is named by the file and is not torch-em's: importing it needs trust
    refused = runner.invoke(app, ["convert", str(tmp_path / "best.pt"), "-o", str(tmp_path / "o.pt")])
    assert refused.exit_code == 2 and "--trust-code" in refused.output
    result = runner.invoke(app, ["convert", str(tmp_path / "best.pt"), "-o", str(tmp_path / "o.pt"), "--trust-code"])
    assert result.exit_code == 0, _output(result)
    _, info = load_checkpoint(tmp_path / "o.pt", trust_code=True)
    assert info.extra["source_kind"] == "torch_em"
    assert info.architecture.target == "cli_arch:SmallNet"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--arch", "cli_arch:SmallNet", "--arch-kwargs", '{"width": 8}'], "do not fit"),
        ([], "--arch package.module:Class"),
        (["--arch", "no_such_module:Net"], "cannot import"),
        (["--arch", "cli_arch:SmallNet", "--arch-kwargs", "{width"], "error"),
    ],
)
def test_convert_bad_input_exit_2(tmp_path, arch_module, args, message) -> None:
    torch.save(arch_module.SmallNet(width=4).state_dict(), tmp_path / "sd.pt")
    out = tmp_path / "o.pt"
    result = runner.invoke(app, ["convert", str(tmp_path / "sd.pt"), "-o", str(out), *args])
    assert result.exit_code == 2, _output(result)
    assert message in _output(result)
    assert not out.exists()


def test_convert_refuses_existing_output_and_missing_source(tmp_path) -> None:
    save_checkpoint(tmp_path / "a.pt", UNet(dims=2, features=4, norm="batchnorm"))
    (tmp_path / "exists.pt").write_bytes(b"keep me")
    result = runner.invoke(app, ["convert", str(tmp_path / "a.pt"), "-o", str(tmp_path / "exists.pt")])
    assert result.exit_code == 2 and "--overwrite" in _output(result)
    assert (tmp_path / "exists.pt").read_bytes() == b"keep me"
    result = runner.invoke(app, ["convert", str(tmp_path / "missing.pt"), "-o", str(tmp_path / "o.pt")])
    assert result.exit_code == 2 and "does not exist" in _output(result)


def test_version_and_help() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and "tilenorm-bmz" in result.output
    result = runner.invoke(app, ["convert", "--help"])
    assert result.exit_code == 0 and "Examples" in result.output


def test_torch_em_checkpoint_with_pickled_loaders_converts_without_unpickling_them(tmp_path, monkeypatch,
                                                                                   arch_module) -> None:
    # torch-em's trainer pickles its datasets into "init": they become inert placeholders, never unpickled
    pkg = tmp_path / "torch_em"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "data.py").write_text("class SegmentationDataset:\n    def __init__(self):\n        self.x = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    import sys

    ds = importlib.import_module("torch_em.data").SegmentationDataset()
    net = arch_module.SmallNet(width=4)
    torch.save({"model_state": net.state_dict(), "init": {"model_class": "cli_arch.SmallNet", "model_kwargs": {},
                                                         "train_dataset": ds}}, tmp_path / "best.pt")
    for name in ("torch_em.data", "torch_em"):
        sys.modules.pop(name)
    (pkg / "data.py").write_text(f"open({str(tmp_path / 'marker')!r}, 'w')\n")  # would run if it were imported
    result = runner.invoke(app, ["convert", str(tmp_path / "best.pt"), "-o", str(tmp_path / "o.pt"), "--trust-code"])
    assert result.exit_code == 0, result.output
    assert "torch_em.data" not in sys.modules and not (tmp_path / "marker").exists()


def test_convert_instancenorm_unet_and_calibrate_on_an_image(tmp_path) -> None:
    import numpy as np
    import tifffile

    from tilenorm_bmz.data import synthetic_blobs

    image, _ = synthetic_blobs((96, 96), seed=3)
    tifffile.imwrite(tmp_path / "img.tif", image[0])
    save_checkpoint(tmp_path / "in.pt", UNet(dims=2, features=4, norm="instancenorm"))
    result = runner.invoke(app, ["convert", str(tmp_path / "in.pt"), "-o", str(tmp_path / "brn.pt"),
                                 "--calibrate", str(tmp_path / "img.tif"), "--calibrate-tiles", "6",
                                 "--tile", "64,64"])
    assert result.exit_code == 0, result.output
    assert "calibrated running statistics on 6 tile(s)" in result.output
    model, info = load_checkpoint(tmp_path / "brn.pt")
    layers = [m for m in model.modules() if isinstance(m, BatchRenorm)]
    assert len(layers) == 10 and info.extra["calibrated_batches"] == 6
    first = layers[0]
    assert int(first.num_batches_tracked) == 6
    assert not torch.allclose(first.running_var, torch.ones_like(first.running_var))  # no longer the init
    assert float(first.r_max) == 1.0 and first.momentum == 0.01  # calibration restored the layer settings
    # a 3D network cannot be calibrated on a 2D image
    save_checkpoint(tmp_path / "in3.pt", UNet(dims=3, features=4, norm="groupnorm"))
    result = runner.invoke(app, ["convert", str(tmp_path / "in3.pt"), "-o", str(tmp_path / "x.pt"),
                                 "--calibrate", str(tmp_path / "img.tif")])
    assert result.exit_code == 2 and "spatial axes" in result.output
    assert not (tmp_path / "x.pt").exists()
    assert np.isfinite(first.running_mean.numpy()).all()


@pytest.mark.bmz
def test_monai_unet_state_dict_converts_and_packages(tmp_path) -> None:
    """A MONAI UNet (BatchNorm) from its state dict: convert -> BatchRenorm checkpoint -> bioimage.io package."""
    import numpy as np

    pytest.importorskip("monai.networks.nets")
    from monai.networks.nets import UNet as MonaiUNet

    from tilenorm_bmz.bmz import read_package_model

    kwargs = {"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "channels": [4, 8, 16], "strides": [2, 2],
              "num_res_units": 0, "norm": "batch"}
    net = randomize_norm_stats(MonaiUNet(**kwargs)).eval()  # statistics as after training
    torch.save(net.state_dict(), tmp_path / "monai.pt")

    result = runner.invoke(app, ["convert", str(tmp_path / "monai.pt"), "--arch", "monai.networks.nets:UNet",
                                 "--arch-kwargs", json.dumps(kwargs), "-o", str(tmp_path / "brn.pt")])
    assert result.exit_code == 0, _output(result)
    model, info = load_checkpoint(tmp_path / "brn.pt")
    assert sum(isinstance(m, BatchRenorm) for m in model.modules()) == 4
    assert info.architecture.divisor == (4, 4) and model.divisor == (4, 4)  # from its strides, kept
    x = torch.rand(1, 1, 64, 48)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x), rtol=0, atol=0)  # BatchNorm -> BatchRenorm: same in eval

    rng = np.random.default_rng(0)
    np.save(tmp_path / "sample.npy", (rng.random((96, 80)) * 500 + 50).astype("float32"))
    result = runner.invoke(app, ["package", str(tmp_path / "brn.pt"), "-o", str(tmp_path / "monai.zip"),
                                 "--sample", str(tmp_path / "sample.npy"), "--name", "monai unet",
                                 "--author", "A. Developer", "--skip-gate"])
    assert result.exit_code == 0, _output(result)
    packaged, _, _ = read_package_model(tmp_path / "monai.zip", trust_code=True)  # its architecture file
    packaged.eval()
    with torch.no_grad():
        torch.testing.assert_close(packaged(x), net(x), rtol=1e-6, atol=1e-6)
