"""Packages written by other tools (tests/fixtures/thirdparty, PROVENANCE.md): what the gate says of each.

The corpus: torch-em 0.10.9's model-zoo export (UNet2d, state dict + its unet.py, declared halo 2), CAREamics
0.3.5's ``export_to_bmz`` (N2V, fixed 256x256, network imported from ``careamics``), and two packages built with
bioimageio.spec's own builder around networks written from scratch (TorchScript only with a fixed 256x256
input; ONNX only with a parameterized input and halo 8).

What must hold for every one of them today: the gate answers with a one-line reason and a collection report
(passed, failed or not-applicable), never a traceback, and never runs a package's code without trust.
Fixed-size inputs and ONNX-only weights are not measured yet (issue 12): their answer is not-applicable.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tilenorm_bmz.cli import app

CORPUS = Path(__file__).parent / "fixtures" / "thirdparty"

EXPECTED = {
    # package: (exit code, collection status, words of the reason)
    # its unet.py would run: refused without trust (the collection report says so: the tool could not run it)
    "torchem_unet2d.zip": (2, "failed", "--trust-code"),
    "careamics_n2v2d.zip": (2, "not-applicable", "fixed size 256"),
    "fixed256_torchscript.zip": (2, "not-applicable", "fixed size 256"),
    "onnx_param.zip": (2, "not-applicable", "no PyTorch weights"),
}


@pytest.mark.bmz
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_gate_answers_every_third_party_package_in_one_line(tmp_path: Path, name: str) -> None:
    code, status, reason = EXPECTED[name]
    package = CORPUS / name
    before = package.read_bytes()
    out = tmp_path / "gate"
    result = CliRunner().invoke(app, ["validate", str(package), "-o", str(out), "--report-format", "collection"])
    text = " ".join(result.output.split())
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and reason in text
    assert package.read_bytes() == before  # inputs are never modified
    (report,) = out.glob("tilenorm-bmz_*.json")
    content = json.loads(report.read_text())
    assert content["status"] == status and reason in " ".join(str(content["details"]).split())


def test_the_corpus_is_what_provenance_lists() -> None:
    provenance = (CORPUS / "PROVENANCE.md").read_text()
    for name in EXPECTED:
        assert (CORPUS / name).exists() and f"`{name}`" in provenance
        assert (CORPUS / f"make_{name.removesuffix('.zip')}.py").exists()
