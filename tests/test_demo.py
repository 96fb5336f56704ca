"""`tilenorm-bmz demo`, the README's main command, end to end."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from tilenorm_bmz.cli import app

runner = CliRunner()


@pytest.mark.slow
@pytest.mark.bmz
def test_demo_runs_the_whole_path(tmp_path) -> None:
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--out", str(out)])
    assert result.exit_code == 0, result.output
    for name in ("train/last.pt", "nuclei2d-demo.bioimageio.zip", "report/report.html", "report/report.json",
                 "prediction.tif"):
        assert (out / name).exists(), name
    assert "accepted" in result.output and "max |diff| = 0:" in result.output
    assert json.loads((out / "report" / "report.json").read_text())["accepted"] is True
    # the analyst's path: the same nuclei as 16 bits in another range are segmented as the 8-bit image is, and
    # the variant refitted on them is seamless in ilastik
    for name in ("your_image_16bit.tif", "your_prediction.tif", "nuclei2d-demo-ilastik.bioimageio.zip"):
        assert (out / name).exists(), name
    match = re.search(r"foreground ([0-9.]+)% \(8-bit image: ([0-9.]+)%\)", result.output)
    assert match is not None, result.output
    assert abs(float(match[1]) - float(match[2])) < 1.0
    assert "gated with ilastik: seams = 0:" in result.output


def test_a_new_demo_run_removes_only_the_demo_artifacts(tmp_path) -> None:
    from tilenorm_bmz.demo import DEMO_ARTIFACTS, _clean

    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "last.pt").write_text("old")
    (tmp_path / "prediction.tif").write_text("old")
    (tmp_path / "mine.txt").write_text("keep")
    _clean(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]
    assert "prediction.tif" in DEMO_ARTIFACTS


def test_demo_rejects_bad_steps(tmp_path) -> None:
    result = runner.invoke(app, ["demo", "--out", str(tmp_path), "--steps", "0"])
    assert result.exit_code == 2 and "--steps" in result.output
