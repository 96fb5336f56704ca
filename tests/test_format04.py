"""A third-party package in bioimage.io format 0.4 (most of the zoo): the gate, predict and convert read it.

The package is built here the way a model developer would have built one with bioimageio.spec's 0.4 classes:
a hand-written network (not tilenorm-bmz's UNet) in its own source file, axes as "bcyx", a parameterized
input shape, an implicit output shape with a halo, per-sample percentile normalization, state dict and
TorchScript weights.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tilenorm_bmz.cli import EXIT_OK, EXIT_REJECTED, app

runner = CliRunner()

pytestmark = pytest.mark.bmz

NETWORK_SOURCE = '''
import torch
from torch import nn


class TinyFCN(nn.Module):
    """Two 3x3 convolutions, a 2x max pool, a 2x upsampling and a 1x1 head; norm after each convolution."""

    def __init__(self, channels=8, norm="batchnorm"):
        super().__init__()

        def norm_layer():
            if norm == "instancenorm":
                return nn.InstanceNorm2d(channels, affine=True)
            return nn.BatchNorm2d(channels)

        self.enc = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), norm_layer(), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.mid = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), norm_layer(), nn.ReLU())
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.head = nn.Conv2d(2 * channels, 1, 1)

    def forward(self, x):
        e = self.enc(x)
        m = self.up(self.mid(self.pool(e)))
        return torch.sigmoid(self.head(torch.cat([e, m], dim=1)))
'''


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_v04_package(folder: Path, norm: str, halo: int = 8, source: str = NETWORK_SOURCE,
                      fixed: bool = False) -> Path:
    """Write a format-0.4 package of ``TinyFCN(norm=norm)`` (random weights, trained-like statistics).

    ``source``: the architecture file's code (it must define ``TinyFCN``). ``fixed``: explicit input and output
    shapes (the test tensor's), the output with a halo, as many zoo packages of format 0.4 are."""
    from bioimageio.spec import ValidationContext, save_bioimageio_package
    from bioimageio.spec.model import v0_4

    folder.mkdir(parents=True)
    src = folder / "tiny_fcn.py"
    src.write_text(source)
    namespace: dict = {}
    exec(compile(source, str(src), "exec"), namespace)
    torch.manual_seed(0)
    net = namespace["TinyFCN"](channels=8, norm=norm)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # statistics as after training, not the init values
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    net.eval()
    torch.save(net.state_dict(), folder / "weights.pt")
    torch.jit.script(net).save(str(folder / "weights.torchscript.pt"))

    rng = np.random.default_rng(0)
    raw = (rng.random((1, 1, 96, 80)) * 200 + 100).astype("float32")
    np.save(folder / "test_input.npy", raw)
    lo, hi = np.percentile(raw, [1, 99.8])
    x = torch.from_numpy(((raw - lo) / (hi - lo + 1e-6)).astype("float32"))
    with torch.no_grad():
        np.save(folder / "test_output.npy", net(x).numpy())
    (folder / "README.md").write_text("# tiny FCN\n\nA third-party test network.\n")

    with ValidationContext(root=folder):  # relative paths, as in a developer's package folder
        descr = _describe(v0_4, folder, norm, halo, fixed)
    out = folder.parent / f"{folder.name}.zip"
    save_bioimageio_package(descr, output_path=out)
    # bioimageio.spec 0.5.12 leaves a 0.4 architecture file ("file.py:Callable") out of the zip; the packages in
    # the zoo, written by the spec versions of their time, carry it, and so does this one
    with zipfile.ZipFile(out, "a") as zf:
        if "tiny_fcn.py" not in zf.namelist():
            zf.write(folder / "tiny_fcn.py", "tiny_fcn.py")
    return out


def _describe(v0_4, folder: Path, norm: str, halo: int, fixed: bool = False):
    return v0_4.ModelDescr(
        format_version="0.4.10",
        type="model",
        name=f"tiny fcn {norm}",
        description="a third-party format 0.4 test package",
        authors=[v0_4.Author(name="A. Developer")],
        cite=[v0_4.CiteEntry(text="test", doi="10.48550/arXiv.2503.19545")],
        documentation="README.md",
        license="CC-BY-4.0",
        timestamp=datetime.now(UTC),
        test_inputs=["test_input.npy"],
        test_outputs=["test_output.npy"],
        inputs=[v0_4.InputTensorDescr(
            name="raw", axes="bcyx", data_type="float32",
            shape=[1, 1, 96, 80] if fixed else v0_4.ParameterizedInputShape(min=[1, 1, 32, 32], step=[0, 0, 16, 16]),
            preprocessing=[v0_4.ScaleRangeDescr(kwargs=v0_4.ScaleRangeKwargs(
                mode="per_sample", axes="yx", min_percentile=1.0, max_percentile=99.8))],
        )],
        outputs=[v0_4.OutputTensorDescr(
            name="prob", axes="bcyx", data_type="float32",
            shape=[1, 1, 96, 80] if fixed else v0_4.ImplicitOutputShape(reference_tensor="raw", scale=[1, 1, 1, 1],
                                                                         offset=[0, 0, 0, 0]),
            halo=[0, 0, halo, halo],
        )],
        weights=v0_4.WeightsDescr(
            pytorch_state_dict=v0_4.PytorchStateDictWeightsDescr(
                source="weights.pt", sha256=_sha256(folder / "weights.pt"),
                architecture=v0_4.CallableFromFile("tiny_fcn.py:TinyFCN"),
                architecture_sha256=_sha256(folder / "tiny_fcn.py"),
                kwargs={"channels": 8, "norm": norm}, pytorch_version="2.13",
            ),
            torchscript=v0_4.TorchscriptWeightsDescr(
                source="weights.torchscript.pt", sha256=_sha256(folder / "weights.torchscript.pt"),
                pytorch_version="2.13",
            ),
        ),
    )


@pytest.fixture(scope="module")
def bn_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_v04_package(tmp_path_factory.mktemp("v04") / "tiny_bn", "batchnorm")


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(1)
    ramp = np.linspace(0, 600, 168, dtype="float32")  # tiles with different intensity statistics
    return (rng.random((1, 200, 168)) * 200 + 100 + ramp).astype("float32")


def test_the_package_is_format_0_4(bn_package: Path) -> None:
    import yaml

    with zipfile.ZipFile(bn_package) as zf:
        rdf = yaml.safe_load(zf.read("rdf.yaml"))
    assert rdf["format_version"].startswith("0.4") and rdf["inputs"][0]["axes"] == "bcyx"


def test_gate_accepts_a_tile_local_0_4_package(tmp_path: Path, bn_package: Path, image: np.ndarray,
                                               no_network) -> None:
    data = tmp_path / "image.npy"
    np.save(data, image)
    result = runner.invoke(app, ["validate", str(bn_package), "--data", str(data), "--out", str(tmp_path / "r"),
                                 "--device", "cpu"])
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    results = report["results"]
    assert results["tile_mismatch"]["max_dist"] == 0.0, result.output
    assert results["tiled_vs_whole"]["tilenorm-bmz TiledPredictor"]["max_abs_diff"] <= 1e-5
    status = {c["name"]: c["status"] for c in report["checks"]}
    assert status["bioimage.io test"] == "passed", result.output
    assert status["seams in bioimageio.core"] == "passed"
    assert status["tile-size sweep"] == "info" and report["results"]["tile_size_sweep"]  # ran
    # per-sample percentile normalization: bioimageio.core normalizes the whole sample, ilastik each tile; the
    # gate reports what ilastik would show and how to fix it, without rejecting a package made elsewhere
    ilastik = next(c for c in report["checks"] if c["name"] == "seams in ilastik")
    assert ilastik["measured"] > 0 and "--input-norm fixed" in ilastik["advice"]
    assert report["accepted"] is True and result.exit_code == EXIT_OK, result.output


def test_gate_rejects_an_instancenorm_0_4_package(tmp_path: Path, image: np.ndarray) -> None:
    package = build_v04_package(tmp_path / "tiny_in", "instancenorm")
    data = tmp_path / "image.npy"
    np.save(data, image)
    result = runner.invoke(app, ["validate", str(package), "--data", str(data), "--out", str(tmp_path / "r"),
                                 "--device", "cpu"])
    assert result.exit_code == EXIT_REJECTED, result.output
    assert "tile" in result.output.lower() and "convert" in result.output


def test_a_valid_0_4_package_with_a_fixed_output_and_a_halo_is_not_called_invalid(tmp_path: Path,
                                                                                 image: np.ndarray) -> None:
    # bioimageio.spec accepts it in its own format; only its conversion to 0.5 refuses a fixed size with a halo:
    # the gate agrees with the reference validator, reads the fixed output shape as the input's, and judges it
    # with tiles of exactly the fixed size
    from bioimageio.spec import InvalidDescr, load_description

    package = build_v04_package(tmp_path / "tiny_fixed", "batchnorm", fixed=True)
    assert not isinstance(load_description(package, perform_io_checks=False, format_version="discover"),
                          InvalidDescr)
    assert isinstance(load_description(package, perform_io_checks=False, format_version="latest"), InvalidDescr)
    data = tmp_path / "image.npy"
    np.save(data, image)
    result = runner.invoke(app, ["validate", str(package), "--data", str(data), "--out", str(tmp_path / "r"),
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output  # BatchNorm, halo 8 above its receptive field, fixed tiles
    assert "invalid" not in result.output.replace("\n", " ").lower()
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["bioimage.io test"]["status"] == "passed"
    assert "tiles of 96 offset by" in checks["tile mismatch"]["details"] or "tiles of 80 offset by" in checks[
        "tile mismatch"]["details"]
    assert checks["tile mismatch"]["measured"] == 0.0


def test_predict_and_convert_read_a_0_4_package(tmp_path: Path, bn_package: Path, image: np.ndarray) -> None:
    from tilenorm_bmz.bmz import read_package_model
    from tilenorm_bmz.checkpoint import load_checkpoint

    model, _, _ = read_package_model(bn_package, trust_code=True)  # its architecture file is the package's code
    x = torch.rand(1, 1, 64, 48)
    data = tmp_path / "image.npy"
    np.save(data, image)
    out = tmp_path / "pred.tif"
    result = runner.invoke(app, ["predict", str(bn_package), str(data), "-o", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output  # without trust: on the package's TorchScript weights
    assert out.exists() and "torchscript" in result.output
    result = runner.invoke(app, ["convert", str(bn_package), "-o", str(tmp_path / "brn.pt")])
    assert result.exit_code == 2 and "--trust-code" in result.output  # converting needs the state dict's code
    result = runner.invoke(app, ["convert", str(bn_package), "-o", str(tmp_path / "brn.pt"), "--trust-code"])
    assert result.exit_code == 0, result.output
    converted, _ = load_checkpoint(tmp_path / "brn.pt", trust_code=True)
    converted.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-6)
