"""Packages written by other tools (tests/fixtures/thirdparty, PROVENANCE.md): the verdict the gate gives each.

The corpus: torch-em 0.10.9's model-zoo export (UNet2d with InstanceNorm, state dict + its unet.py, declared
halo 2), CAREamics 0.3.5's ``export_to_bmz`` (N2V, fixed 256x256, network imported from ``careamics``; once as
exported, once with TorchScript added by bioimageio.core's weight converter), and
packages built with bioimageio.spec's own builder around networks written from scratch: TorchScript only with a
fixed 256x256 input and no halo; ONNX only with a parameterized input and halo 8; format 0.4 with a fixed output
shape and a halo; a BatchNorm denoiser (regression output); a half-resolution output; two inputs (one --data
each).

Each row says what the gate must answer and why. Every answer is one line and a collection report (passed,
failed or not-applicable), never a traceback, and no package's code runs without trust.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tilenorm_bmz.cli import app

CORPUS = Path(__file__).parent / "fixtures" / "thirdparty"

EXPECTED = {
    # case: (package, extra arguments, exit code, collection status, words of the reason or of a failed check)
    # its unet.py would run: refused without trust (the collection report says the tool could not run it)
    "torch-em, untrusted": ("torchem_unet2d.zip", [], 2, "failed", "--trust-code"),
    # trusted: InstanceNorm couples every tile, which the seam advice names, and the halo 2 cannot cover it
    "torch-em, trusted": ("torchem_unet2d.zip", ["--trust-code", "DATA"], 1, "failed", "InstanceNorm2d"),
    # the architecture is imported from the careamics library, which runs only with trust
    "CAREamics": ("careamics_n2v2d.zip", [], 2, "failed", "--trust-code"),
    # the same with TorchScript added by bioimageio.core 0.11's converter, which traces the network in train
    # mode: batch statistics are baked into the graph, so tiles disagree (regression output, relative) and the
    # package fails its own test; the advice names the traced operators
    "CAREamics + core's TorchScript": ("careamics_n2v2d_torchscript.zip", ["DATA"], 1, "failed",
                                       "aten::batch_norm (training=True) was traced in train mode"),
    # fixed 256x256: two overlapping tiles need a larger image than the package's own test input
    "fixed 256, own test input": ("fixed256_torchscript.zip", [], 2, "not-applicable", "larger than that"),
    # on a larger image: no halo at all, so overlapping fixed tiles disagree at their borders
    "fixed 256, larger image": ("fixed256_torchscript.zip", ["DATA"], 1, "failed",
                                "halo (0, 0) is below the measured one-sided receptive field (5, 5)"),
    # ONNX only: the receptive field from the impulse response (13) exceeds the declared halo 8
    "ONNX only": ("onnx_param.zip", ["DATA"], 1, "failed", "receptive field (13, 13)"),
    # 0.4, fixed output shape with a halo (bioimageio.spec cannot convert it; core passes it): BatchNorm, halo
    # 16 above the receptive field, fixed preprocessing of the whole image -> seamless in every gating consumer
    "0.4 fixed output with halo": ("fixed04_halo.zip", ["DATA"], 0, "passed", "accepted"),
    # a regression output (denoiser with BatchNorm, traced): judged relative to the output range
    "regression (denoiser)": ("denoise_bn_torchscript.zip", ["DATA"], 0, "passed", "output range"),
    # an output at half the input's resolution (output scale 2): tiled in input space, every output voxel
    # compared at its input position; halo 4 output voxels = 8 input voxels, above the receptive field (4)
    "output at half resolution": ("scaled_output.zip", ["DATA"], 0, "passed", "accepted"),
    # two inputs (an image and a hint on its grid): one --data per input, tiled with the same blocks; seamless.
    # bioimageio.core's own blocked prediction fails on it (it pads only the input the output refers to)
    "two inputs": ("two_inputs.zip", ["DATA", "HINT"], 0, "passed", "accepted"),
    "two inputs, one image": ("two_inputs.zip", ["DATA"], 2, "failed", "give one --data per input"),
}


@pytest.fixture(scope="module")
def blobs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 384x416 image of Gaussian blobs on a noisy background (larger than a 256x256 fixed tile)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:384, :416]
    img = np.full((384, 416), 20.0, dtype=np.float32)
    for _ in range(40):
        cy, cx, r = rng.uniform(0, 384), rng.uniform(0, 416), rng.uniform(6, 14)
        img += 200 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    img += rng.normal(0, 5, img.shape).astype(np.float32)
    path = tmp_path_factory.mktemp("data") / "blobs.npy"
    np.save(path, img.astype(np.float32))
    return path


@pytest.fixture(scope="module")
def hint(blobs: Path) -> Path:
    """A second input on the same grid: the blobs smoothed."""
    from scipy import ndimage as ndi

    path = blobs.with_name("hint.npy")
    np.save(path, ndi.gaussian_filter(np.load(blobs), 4).astype(np.float32))
    return path


@pytest.mark.bmz
@pytest.mark.parametrize("case", list(EXPECTED))
def test_the_gate_gives_every_third_party_package_its_verdict(tmp_path: Path, blobs: Path, hint: Path,
                                                              case: str) -> None:
    name, extra, code, status, reason = EXPECTED[case]
    package = CORPUS / name
    before = package.read_bytes()
    out = tmp_path / "gate"
    data = {"DATA": ["--data", str(blobs)], "HINT": ["--data", str(hint)]}
    args = [a for e in extra for a in data.get(e, [e])]
    if code != 2 and "bioimage.io test" not in reason:
        args += ["--skip", "sweep"]  # informational, and the slowest part on these small networks
    result = CliRunner().invoke(app, ["validate", str(package), "-o", str(out), "--report-format", "collection",
                                      *args])
    text = " ".join(result.output.split())
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert package.read_bytes() == before  # inputs are never modified
    (collection,) = out.glob("tilenorm-bmz_*.json")
    content = json.loads(collection.read_text())
    assert content["status"] == status
    if code == 2:  # no verdict: the reason is the one line, and the collection report's details
        assert reason in text and reason in " ".join(str(content["details"]).split())
        return
    report = json.loads((out / "report.json").read_text())
    words = " ".join(f"{c['name']} {c['threshold']} {c['advice']}" for c in report["checks"])
    assert reason in " ".join(words.split()) or reason in text
    assert report["accepted"] is (code == 0)


def test_the_gate_measures_what_each_consumer_runs(tmp_path: Path, blobs: Path) -> None:
    """The 0.4 fixed-size package: every consumer tiles with its 256x256 tiles, and deepImageJ is emulated."""
    out = tmp_path / "gate"
    result = CliRunner().invoke(app, ["validate", str(CORPUS / "fixed04_halo.zip"), "-o", str(out),
                                      "--data", str(blobs)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["bioimage.io test"]["status"] == "passed"  # the reference validator's verdict, not the converter's
    assert "tiles of 256 offset by" in checks["tile mismatch"]["details"]
    assert "blocks of 256x256" in checks["seams in bioimageio.core"]["details"]
    assert "tiles of 256x256" in checks["seams in ilastik"]["details"]
    assert "tiles of 256x256" in checks["seams in deepImageJ"]["details"]
    assert checks["seams in deepImageJ"]["measured"] == 0.0  # whole-image preprocessing, halo 16 >= TRF
    assert checks["seams in ilastik"]["measured"] > 0  # per-tile scale_range: reported, not gating
    assert checks["tile-size sweep"]["measured"] is None and "one size (256x256)" in checks["tile-size sweep"]["advice"]


def test_the_corpus_is_what_provenance_lists() -> None:
    provenance = (CORPUS / "PROVENANCE.md").read_text()
    for name, *_ in EXPECTED.values():
        assert (CORPUS / name).exists() and f"`{name}`" in provenance
        assert (CORPUS / f"make_{name.removesuffix('.zip')}.py").exists()
