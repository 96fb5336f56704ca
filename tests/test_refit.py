"""`tilenorm-bmz refit`: a package for one's dataset with fixed preprocessing, seamless in ilastik."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tilenorm_bmz.bmz._yaml import load_yaml
from tilenorm_bmz.cli import EXIT_BAD_INPUT, EXIT_OK, app

from .test_format04 import build_v04_package

runner = CliRunner()

pytestmark = pytest.mark.bmz


@pytest.fixture(scope="module")
def third_party(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # someone's format-0.4 package with per-sample percentile normalization (per tile in ilastik: seams)
    return build_v04_package(tmp_path_factory.mktemp("refit") / "tiny_bn", "batchnorm")


def test_refit_writes_a_tested_gated_package_with_values_from_the_data(third_party: Path, tmp_path: Path) -> None:
    import zipfile

    rng = np.random.default_rng(3)
    ramp = np.linspace(0, 3000, 168, dtype="float32")  # a 16-bit microscope's range, with a gradient
    for i in range(2):
        np.save(tmp_path / f"img{i}.npy", (rng.random((1, 200, 168)) * 2000 + 30000 + ramp).astype("uint16"))
    out = tmp_path / "for_ilastik.zip"
    result = runner.invoke(app, ["refit", str(third_party), "--data", str(tmp_path / "img0.npy"), "--data",
                                 str(tmp_path / "img1.npy"), "-o", str(out), "--upper", "0.99"])
    assert result.exit_code == EXIT_OK, result.output
    with zipfile.ZipFile(out) as zf:
        rdf = load_yaml(zf.read("rdf.yaml").decode())
    steps = [s["id"] for s in rdf["inputs"][0]["preprocessing"]]
    assert "scale_linear" in steps and "clip" in steps and "scale_range" not in steps
    refit = rdf["config"]["tilenorm_bmz"]["refit"]
    pooled = np.concatenate([np.load(tmp_path / f"img{i}.npy").reshape(-1) for i in range(2)])
    np.testing.assert_allclose(refit["low"], [np.quantile(pooled, 0.01)], rtol=1e-6)
    np.testing.assert_allclose(refit["high"], [np.quantile(pooled, 0.99)], rtol=1e-6)
    assert refit["data"] == [str(tmp_path / "img0.npy"), str(tmp_path / "img1.npy")]
    report = json.loads((tmp_path / "for_ilastik.gate" / "report.json").read_text())
    ilastik = next(c for c in report["checks"] if c["name"] == "seams in ilastik")
    assert report["accepted"] and ilastik["status"] == "passed"  # fixed values: every tile the same
    assert third_party.exists()  # the source is only read


def test_refit_refuses_data_that_does_not_fit_the_package(third_party: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "volume.npy", np.zeros((1, 8, 64, 64), "float32"))  # 3D data for a 2D package
    result = runner.invoke(app, ["refit", str(third_party), "--data", str(tmp_path / "volume.npy"), "-o",
                                 str(tmp_path / "x.zip")])
    assert result.exit_code == EXIT_BAD_INPUT and "3 spatial axes" in result.output
    assert not (tmp_path / "x.zip").exists()


def test_a_percentile_package_works_on_any_bit_depth(third_party: Path, tmp_path: Path) -> None:
    out = tmp_path / "percentile.zip"
    result = runner.invoke(app, ["refit", str(third_party), "--percentile", "-o", str(out)])
    assert result.exit_code == EXIT_OK, result.output
    rng = np.random.default_rng(5)
    eight_bit = np.round(rng.random((1, 96, 80)) * 200 + 20).astype("uint8")
    sixteen_bit = (eight_bit.astype("uint16") * 150 + 30000).astype("uint16")  # another camera, same scene
    preds = []
    for name, image in (("a", eight_bit), ("b", sixteen_bit)):
        np.save(tmp_path / f"{name}.npy", image)
        r = runner.invoke(app, ["predict", str(out), str(tmp_path / f"{name}.npy"), "-o", str(tmp_path / f"p{name}.npy"),
                                "--device", "cpu"])
        assert r.exit_code == EXIT_OK, r.output
        preds.append(np.load(tmp_path / f"p{name}.npy"))
    np.testing.assert_allclose(preds[0], preds[1], atol=1e-4)  # the intensity range does not matter


def test_refit_defaults_to_the_packages_own_percentiles(third_party: Path) -> None:
    """Fixed values at the package's own percentiles give on the fitted data what its percentile step gives."""
    from tilenorm_bmz.bmz.refit import _open_descr, package_quantiles

    descr, _ = _open_descr(third_party, False)
    assert package_quantiles(descr) == pytest.approx((0.01, 0.998))  # its scale_range: 1% / 99.8%
