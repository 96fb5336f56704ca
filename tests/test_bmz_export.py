"""bioimage.io export: packages pass bioimageio.core tests, read back exactly, and are read by the legacy stack."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tilenorm_bmz.bmz import (
    PackageRejected,
    check_compatibility,
    export_package,
    read_package_model,
)
from tilenorm_bmz.bmz._yaml import load_yaml
from tilenorm_bmz.bmz.geometry import package_geometry
from tilenorm_bmz.checkpoint import ArchitectureSpec, build_model, load_checkpoint, save_checkpoint
from tilenorm_bmz.config import ExportConfig
from tilenorm_bmz.conversion import convert_source
from tilenorm_bmz.errors import IntegrityError, TrustError
from tilenorm_bmz.introspect import round_halo
from tilenorm_bmz.models import UNet

from .conftest import randomize_norm_stats

pytestmark = pytest.mark.bmz

LEGACY_VENV = Path(os.environ.get("TILENORM_LEGACY_VENV", "/tmp/tilenorm-legacy-venv"))
CFG = ExportConfig(authors=[{"name": "Test Author", "affiliation": "Test Lab"}])


def blobs(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Raw-looking image: background ~100 with noise, bright discs ~600 (not normalized, not tiny)."""
    rng = np.random.default_rng(seed)
    img = rng.normal(100.0, 10.0, shape).astype(np.float32)
    grid = np.indices(shape)
    for _ in range(8):
        centre = [rng.integers(6, s - 6) for s in shape]
        r2 = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True))
        img[r2 < 30] += 500.0
    return img


def tiny_unet(dims: int, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return randomize_norm_stats(UNet(dims=dims, depth=1, features=4 if dims == 2 else 2), seed).eval()


def rdf_of(package: Path) -> dict:
    with zipfile.ZipFile(package) as zf:
        return load_yaml(zf.read("rdf.yaml"))


class _NetworkGuard:
    """Refuse (and record) every socket connection and host-name lookup."""

    def __init__(self) -> None:
        self.attempts: list[str] = []

    def refuse(self, *args, **kwargs):
        self.attempts.append(repr(args[:2]))
        raise OSError(f"network access attempted: {args[:2]}")


@pytest.fixture(scope="module")
def package_2d(tmp_path_factory: pytest.TempPathFactory):
    """A 2D package of a BatchRenorm checkpoint, exported (and tested) with every socket refused."""
    folder = tmp_path_factory.mktemp("pkg2d")
    ckpt = save_checkpoint(
        folder / "ckpt.pt", tiny_unet(2), input_normalization={"mode": "global", "lower": 0.01, "upper": 0.98},
    )
    guard = _NetworkGuard()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", guard.refuse)
        mp.setattr(socket, "getaddrinfo", guard.refuse)
        mp.setattr(socket, "create_connection", guard.refuse)
        result = export_package(ckpt, folder / "model.zip", export_config=CFG, sample=blobs((72, 80)))
    return ckpt, result, guard


# -- the default suite ------------------------------------------------------------------------------------
def test_2d_package_passes_bioimageio_tests_offline(package_2d) -> None:
    _, result, guard = package_2d
    assert guard.attempts == []
    assert result.status == "written" and result.package is not None and result.package.exists()
    assert result.test is not None and result.test.passed, result.test.markdown
    names = " ".join(c.name for c in result.test.checks)
    for wf in ("pytorch_state_dict", "torchscript"):
        assert f"Reproduce test outputs from test inputs ({wf})" in names
        assert f"Run {wf} inference for inputs with batch_size: 2 and size parameter n: 2" in names


def test_network_guard_refuses_lookups() -> None:
    guard = _NetworkGuard()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket, "getaddrinfo", guard.refuse)
        with pytest.raises(OSError, match="network access attempted"):
            socket.getaddrinfo("bioimage.io", 443)
    assert guard.attempts


def test_2d_package_metadata(package_2d) -> None:
    _, result, _ = package_2d
    rdf = rdf_of(result.package)
    assert rdf["format_version"] == "0.5.4"  # legacy mode is the default
    assert isinstance(rdf["documentation"], str) and all(isinstance(c, str) for c in rdf["covers"])
    assert "github_user" not in json.dumps(rdf)
    inp, out = rdf["inputs"][0], rdf["outputs"][0]
    assert [a.get("id", a["type"]) for a in inp["axes"]] == ["batch", "channel", "y", "x"]
    for axis, out_axis in zip(inp["axes"][2:], out["axes"][2:], strict=True):
        size, halo = axis["size"], out_axis["halo"]
        assert size["min"] % size["step"] == 0 and (2 * halo) % size["step"] == 0
        assert size["min"] >= 2 * halo + size["step"]
        assert halo >= result.measured_halo[axis["id"]]
        assert out_axis["size"] == {"tensor_id": "raw", "axis_id": axis["id"]}
    scale_range = next(p for p in inp["preprocessing"] if p["id"] == "scale_range")["kwargs"]
    assert scale_range["axes"] == ["y", "x"]  # per sample: never the batch axis
    assert (scale_range["min_percentile"], scale_range["max_percentile"]) == (1.0, 98.0)
    assert any(p["id"] == "clip" for p in inp["preprocessing"])
    tool = rdf["config"]["tilenorm_bmz"]
    assert tool["norm_kind"] == {"trained": "batchrenorm", "exported": "batchnorm"}
    assert tool["halo"] == result.halo and tool["receptive_field"]["recommended_halo"]
    assert "reproducibility_tolerance" not in rdf["config"]["bioimageio"]
    cites = " ".join(c.get("doi", "") for c in rdf["cite"])
    assert "2503.19545" in cites and "1702.03275" in cites
    with zipfile.ZipFile(result.package) as zf:
        readme = zf.read(rdf["documentation"]).decode()
        raw = np.load(zf.open(inp["test_tensor"]["source"]))
        assert zf.read("unet.py") == Path(__file__).parents[1].joinpath("tilenorm_bmz/models/unet.py").read_bytes()
    assert "# Validation" in readme and "ilastik" in readme and "deepImageJ" in readme
    assert raw.max() > 500  # raw, un-normalized data
    assert result.compatibility is not None
    assert result.compatibility.compatible("ilastik") and result.compatibility.compatible("deepimagej")


def test_round_trip_every_tensor_equal(package_2d, tmp_path: Path) -> None:
    ckpt, result, _ = package_2d
    _, spec, extra = read_package_model(result.package)
    assert spec.kind == "unet" and spec.kwargs["norm"]["kind"] == "batchnorm"
    assert extra["input_normalization"]["mode"] == "global"
    converted = convert_source(result.package)
    back = converted.save(tmp_path / "back.pt")
    original, _ = load_checkpoint(ckpt)
    restored, info = load_checkpoint(back)
    a, b = original.state_dict(), restored.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert info.extra["input_normalization"] == extra["input_normalization"]


def test_3d_package_passes_bioimageio_tests(tmp_path: Path) -> None:
    result = export_package(tiny_unet(3), tmp_path / "m3d.zip", export_config=CFG, sample=blobs((28, 36, 36)))
    assert result.test is not None and result.test.passed, result.test.markdown
    assert result.axes == ["z", "y", "x"]
    assert {"pytorch_state_dict", "torchscript"} == set(result.weight_formats)


def test_halo_below_receptive_field_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="tilenorm_bmz"):
        result = export_package(tiny_unet(2), tmp_path / "m.zip", export_config=CFG, sample=blobs((64, 64)),
                                halo=2, test=False)
    assert any("below the measured receptive field" in r.message for r in caplog.records)
    assert result.halo == {"y": 2, "x": 2} and result.measured_halo["y"] > 2


def test_failing_package_is_kept_as_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tilenorm_bmz.bmz import export as export_module

    real = export_module.make_test_tensors

    def corrupt(*args, **kwargs):
        tensors = real(*args, **kwargs)
        tensors.output = tensors.output + 0.5  # a test output no weight format reproduces
        return tensors

    monkeypatch.setattr(export_module, "make_test_tensors", corrupt)
    out = tmp_path / "model.zip"
    with pytest.raises(PackageRejected) as info:
        export_package(tiny_unet(2), out, export_config=CFG, sample=blobs((64, 64)),
                       weight_formats=["pytorch_state_dict"])
    result = info.value.result
    assert not out.exists()
    assert result.status == "rejected" and result.rejected == tmp_path / "model.rejected.zip"
    assert result.rejected.exists()
    assert any("Reproduce test outputs" in c.name for c in result.test.failed_checks)
    summary = (tmp_path / "model.rejected.summary.md").read_text()
    assert "Reproduce test outputs" in summary
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tilenorm_tmp")]


def test_gate_hook_can_reject(tmp_path: Path) -> None:
    class Verdict:
        accepted = False

    seen: list[Path] = []

    def gate(candidate: Path) -> Verdict:
        seen.append(candidate)
        assert zipfile.is_zipfile(candidate)
        return Verdict()

    with pytest.raises(PackageRejected, match="gate"):
        export_package(tiny_unet(2), tmp_path / "m.zip", export_config=CFG, sample=blobs((64, 64)),
                       test=False, gate=gate)
    assert seen and (tmp_path / "m.rejected.zip").exists() and not (tmp_path / "m.zip").exists()


def test_non_legacy_package_fails_consumer_checks(tmp_path: Path) -> None:
    result = export_package(tiny_unet(2), tmp_path / "m.zip", export_config=CFG, sample=blobs((64, 64)),
                            legacy=False, test=False, input_norm="fixed")
    rdf = rdf_of(result.package)
    assert rdf["format_version"] == "0.5.12" and isinstance(rdf["documentation"], dict)
    report = check_compatibility(result.package)
    failed = {(c.consumer, c.name) for c in report.failed}
    assert ("ilastik", "readable by bioimageio.spec 0.5.9 (ilastik's stack)") in failed
    assert ("deepimagej", "no format 0.5.11+ file objects") in failed
    assert all(c.fix for c in report.failed)
    steps = [p["id"] for p in rdf["inputs"][0]["preprocessing"]]
    assert "scale_linear" in steps and "scale_range" not in steps
    assert not [c for c in report.checks if c.name == "tile-consistent preprocessing" and c.status != "pass"]


def test_export_needs_authors_and_sample(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="author"):
        export_package(tiny_unet(2), tmp_path / "m.zip", export_config=ExportConfig(), sample=blobs((64, 64)))
    with pytest.raises(ValueError, match="--sample"):
        export_package(tiny_unet(2), tmp_path / "m.zip", export_config=CFG)
    with pytest.raises(ValueError, match="too small"):
        export_package(tiny_unet(2), tmp_path / "m.zip", export_config=CFG, sample=blobs((16, 64)))


FOREIGN_SOURCE = '''
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, channels: int = 4):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.GroupNorm(2, channels), nn.ReLU(),
            nn.Conv2d(channels, 2, 3, padding=1), nn.Sigmoid(),
        )

    def forward(self, x):
        return self.body(x)
'''


def test_foreign_architecture_from_source(tmp_path: Path) -> None:
    spec = ArchitectureSpec(kind="source", source_code=FOREIGN_SOURCE, source_name="tiny_net.py", callable="TinyNet",
                            kwargs={"channels": 4}, norm_conversion="batchrenorm", convert_dims=2)
    model = randomize_norm_stats(build_model(spec, trust_code=True)).eval()
    ckpt = save_checkpoint(tmp_path / "foreign.pt", model, architecture=spec)
    with pytest.raises(TrustError, match="--trust-code"):  # a stored source runs only when trusted
        export_package(ckpt, tmp_path / "f.zip", export_config=CFG, sample=blobs((64, 64)), divisor=(1, 1))
    result = export_package(ckpt, tmp_path / "f.zip", export_config=CFG, sample=blobs((64, 64)),
                            divisor=(1, 1), weight_formats=["pytorch_state_dict"], trust_code=True)
    assert result.test is not None and result.test.passed, result.test.markdown
    rdf = rdf_of(result.package)
    assert rdf["weights"]["pytorch_state_dict"]["architecture"]["callable"] == "TilenormExportedNetwork"
    with pytest.raises(TrustError, match="--trust-code"):  # the package's architecture file is its code
        read_package_model(result.package)
    back, back_spec, _ = read_package_model(result.package, trust_code=True)
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    assert back_spec.kind == "source"


def test_zip_with_path_traversal_is_refused(tmp_path: Path) -> None:
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("rdf.yaml", "type: model\n")
        zf.writestr("../outside.txt", "x")
    before = evil.read_bytes()
    with pytest.raises(IntegrityError, match="unsafe"):
        read_package_model(evil)
    assert not (tmp_path.parent / "outside.txt").exists()
    assert evil.read_bytes() == before


def test_geometry_rules() -> None:
    assert round_halo(9, 4) == 10 and round_halo(8, 4) == 8 and round_halo(3, 3) == 3 and round_halo(2, 3) == 3
    (g,) = package_geometry(["x"], [4], [9])
    assert g.halo == 10 and g.min == 24 and g.min % g.step == 0 and g.min >= 2 * g.halo + g.step
    with pytest.raises(ValueError, match="--halo"):
        package_geometry(["x"], [4], None)


def test_export_config_yaml_round_trip(tmp_path: Path) -> None:
    cfg = ExportConfig(
        name="Nuclei BRN U-Net", authors=[{"name": "A B", "orcid": "0000-0002-1825-0097"}],
        citations=[{"text": "Some paper", "doi": "10.1000/xyz"}], weight_formats=["torchscript", "onnx"],
        halo=[8, 16, 16], input_norm="fixed", legacy=False,
    )
    assert ExportConfig.from_yaml(cfg.to_yaml(tmp_path / "e.yaml")) == cfg
    with pytest.raises(ValueError, match=r"github_user|extra"):
        ExportConfig.model_validate({"authors": [{"name": "A", "github_user": "a"}]})


# -- slow ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_onnx_package_passes(tmp_path: Path) -> None:
    result = export_package(tiny_unet(2), tmp_path / "m.zip", export_config=CFG, sample=blobs((64, 64)),
                            weight_formats=["pytorch_state_dict", "torchscript", "onnx"])
    assert result.test is not None and result.test.passed, result.test.markdown
    assert any(c.name == "Reproduce test outputs from test inputs (onnx)" for c in result.test.checks)
    onnx = rdf_of(result.package)["weights"]["onnx"]
    assert onnx["opset_version"] == 17 and not onnx.get("external_data")


def _legacy_test(package: Path, tmp_path: Path) -> dict:
    summary = tmp_path / f"{package.stem}.summary.json"
    proc = subprocess.run(
        [str(LEGACY_VENV / "bin" / "bioimageio"), "test", str(package), "--determinism", "full",
         "--summary", str(summary)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "NO_COLOR": "1"}, check=False,
    )
    assert summary.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"rc": proc.returncode, **json.loads(summary.read_text())}


@pytest.mark.slow
@pytest.mark.skipif(
    not (LEGACY_VENV / "bin" / "bioimageio").exists(),
    reason=f"no legacy bioimage.io environment at {LEGACY_VENV}: create it with `bash scripts/legacy_env.sh` "
    "(bioimageio.core 0.10.2, spec 0.5.9.1: ilastik's stack)",
)
def test_legacy_stack_reads_package(package_2d, tmp_path: Path) -> None:
    version = subprocess.run([str(LEGACY_VENV / "bin" / "python"), "-c",
                              "import bioimageio.core as c, bioimageio.spec as s; print(c.__version__, s.__version__)"],
                             capture_output=True, text=True, check=True).stdout.split()
    assert version == ["0.10.2", "0.5.9.1"]
    _, result, _ = package_2d
    legacy = _legacy_test(result.package, tmp_path)
    assert legacy["rc"] == 0 and legacy["status"] == "passed", json.dumps(legacy["details"])[:3000]
    assert any("Reproduce test outputs" in d["name"] and d["status"] == "passed" for d in legacy["details"])
    # without the rewrite, ilastik's stack cannot read the package: the legacy mode is what makes it work
    modern = export_package(tiny_unet(2), tmp_path / "modern.zip", export_config=CFG, sample=blobs((64, 64)),
                            legacy=False, test=False)
    assert _legacy_test(modern.package, tmp_path)["status"] == "failed"


def test_cli_package(tmp_path: Path) -> None:
    import tifffile
    from typer.testing import CliRunner

    from tilenorm_bmz.cli import app

    ckpt = save_checkpoint(tmp_path / "ckpt.pt", tiny_unet(2), validation_data=[str(tmp_path / "val.tif")])
    runner = CliRunner()
    missing = runner.invoke(app, ["package", str(ckpt), "-o", str(tmp_path / "m.zip"), "--author", "Jane Doe"])
    assert missing.exit_code == 2 and "--sample" in missing.output  # recorded validation image absent
    assert not (tmp_path / "m.zip").exists()
    tifffile.imwrite(tmp_path / "val.tif", blobs((64, 64)))
    no_author = runner.invoke(app, ["package", str(ckpt), "-o", str(tmp_path / "m.zip")])
    assert no_author.exit_code == 2 and "author" in no_author.output
    # random running statistics fail the validation gate (tests/test_gate.py); this test is about the export
    ok = runner.invoke(app, ["package", str(ckpt), "-o", str(tmp_path / "m.zip"), "--author", "Jane Doe",
                             "--name", "Tiny test net", "--skip-gate"])
    assert ok.exit_code == 0, ok.output
    assert "bioimage.io test passed" in ok.output and "deepimagej" in ok.output
    assert rdf_of(tmp_path / "m.zip")["name"] == "Tiny test net"
    again = runner.invoke(app, ["package", str(ckpt), "-o", str(tmp_path / "m.zip"), "--author", "Jane Doe"])
    assert again.exit_code == 2 and "--overwrite" in again.output
