"""Report: checks, report.json content, and a self-contained report.html with its figures."""

from __future__ import annotations

import base64
import json
import re
import sys
from typing import Any

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi
from torch import nn

from tests.conftest import randomize_norm_stats
from tilenorm_bmz.metrics import (
    halo_sufficiency,
    tile_mismatch,
    tile_size_sweep,
    tiled_vs_whole,
    train_eval_disparity,
)
from tilenorm_bmz.models import UNet
from tilenorm_bmz.report import (
    Check,
    DataInfo,
    Report,
    check_disparity,
    check_halo,
    check_sweep,
    check_tile_mismatch,
    check_tiled_vs_whole,
    write_report,
)
from tilenorm_bmz.tiling import receptive_field
from tilenorm_bmz.tiling.predictor import TiledPredictor

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _net(norm: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_norm_stats(UNet(dims=2, features=4, depth=2, norm=norm), seed=seed).eval()


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    img = ndi.gaussian_filter(rng.standard_normal((64, 160)), 3)[None].astype(np.float32)
    img = (img - img.mean()) / img.std()
    inn, bn = _net("instancenorm"), _net("batchnorm")
    with torch.no_grad():  # running statistics far from the data: train/eval disparity
        for m in bn.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.add_(1.0)
    rf = receptive_field(bn, 2, n_samples=2)
    return {
        "image": img,
        "tile_mismatch": tile_mismatch(inn, img, halo=24, crop_shape=(64, 150), tile=100, device="cpu"),
        "seamless": tile_mismatch(bn, img, halo=24, crop_shape=(64, 150), tile=100, device="cpu"),
        "disparity": train_eval_disparity(bn, img, n_tiles=2, tile_shape=32, device="cpu"),
        "not_applicable": train_eval_disparity(inn, img, n_tiles=1, tile_shape=32, device="cpu"),
        "seams": {
            "TiledPredictor": tiled_vs_whole(TiledPredictor(inn, 64, 24, device="cpu").predict, inn, img)
        },
        "halo": halo_sufficiency(8, rf),
        "sweep": tile_size_sweep(inn, img, halo=24, tile_sizes=(64, 96, 160), device="cpu"),
        "receptive_field": rf,
    }


def _checks(r: dict[str, Any]) -> list[Check]:
    return [
        check_tile_mismatch(r["tile_mismatch"]),
        check_disparity(r["disparity"]),
        check_tiled_vs_whole(r["seams"]["TiledPredictor"]),
        check_halo(r["halo"]),
        check_sweep(r["sweep"]),
    ]


def _write(tmp_path, r: dict[str, Any], **kw: Any):
    return write_report(
        tmp_path / "report",
        checks=_checks(r),
        accepted=False,
        subject="tiny test networks",
        data=[DataInfo.from_array("synthetic blobs", r["image"], note="test data")],
        tile_mismatch=r["tile_mismatch"],
        disparity=r["disparity"],
        seams=r["seams"],
        halo=r["halo"],
        sweep=r["sweep"],
        receptive_field=r["receptive_field"],
        device="cpu",
        **kw,
    )


def _keys(obj: Any) -> set[str]:
    if isinstance(obj, dict):
        return set(obj) | set().union(*(_keys(v) for v in obj.values()))
    if isinstance(obj, list):
        return set().union(*(_keys(v) for v in obj))
    return set()


def test_checks_from_results(results):
    mm = check_tile_mismatch(results["tile_mismatch"])
    assert mm.status == "failed" and "tilenorm-bmz convert" in mm.advice and mm.measured > 1e-4
    assert check_tile_mismatch(results["seamless"]).status == "passed"
    assert check_tile_mismatch(results["tile_mismatch"], max_dist=10.0).status == "passed"
    disp = check_disparity(results["disparity"])
    assert disp.status == "failed" and "--calibrate" in disp.advice
    na = check_disparity(results["not_applicable"])
    assert na.status == "not-applicable" and na.passed is None and "running statistics" in na.advice
    halo = check_halo(results["halo"])
    assert halo.status == "failed" and "increase the halo to 24x24" in halo.advice
    assert check_sweep(results["sweep"]).status == "info"
    assert check_sweep(results["sweep"], max_range=1.0).status == "passed"


def test_report_json(tmp_path, results):
    paths = _write(tmp_path, results, extra={"bioimageio_test": {"status": "passed", "n": np.int64(3)}})
    assert paths.json.name == "report.json" and paths.html.name == "report.html"
    doc = json.loads(paths.json.read_text())
    assert doc["schema"] == "tilenorm_bmz.report/1" and doc["accepted"] is False
    assert set(doc["failed_checks"]) == {
        "tile mismatch",
        "train/eval disparity",
        "tiled vs whole",
        "halo sufficiency",
    }
    assert [c["name"] for c in doc["checks"]][:2] == ["tile mismatch", "train/eval disparity"]
    assert set(doc["results"]) == {
        "tile_mismatch",
        "train_eval_disparity",
        "tiled_vs_whole",
        "halo_sufficiency",
        "tile_size_sweep",
        "receptive_field",
    }
    assert doc["results"]["tile_mismatch"]["max_dist"] == results["tile_mismatch"].max_dist
    assert doc["results"]["tiled_vs_whole"]["TiledPredictor"]["seamless"] is False
    env = doc["environment"]
    assert env["packages"]["torch"] == torch.__version__ and env["python"] == sys.version.split()[0]
    assert env["device"] == "cpu" and "bioimageio.core" in env["packages"]
    assert doc["data"][0]["shape"] == [1, 64, 160] and doc["extra"]["bioimageio_test"]["n"] == 3
    # figure arrays never reach the JSON
    assert not _keys(doc) & {"figure", "mean_abs_gradient"}


def test_report_html_is_self_contained_with_figures(tmp_path, results):
    page = _write(tmp_path, results).html.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "REJECTED" in page
    # nothing is fetched: no remote or relative resources, no scripts, no external styles
    assert not re.search(r"""(?:src|href)\s*=\s*(?!["']?(?:data:|#))""", page, re.IGNORECASE)
    for forbidden in ("<script", "<link", "@import", "url(", "http://", "https://"):
        assert forbidden not in page.lower()
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    # tile mismatch, train vs eval, seams, tile-size sweep, receptive field
    assert len(images) == 5
    for data in images:
        assert base64.b64decode(data).startswith(PNG_SIGNATURE)
    for section in (
        'id="tile-mismatch"',
        'id="disparity"',
        'id="seams"',
        'id="sweep"',
        'id="receptive-field"',
    ):
        assert section in page
    assert "increase the halo to 24x24" in page


def test_report_escapes_text_and_renders_without_results(tmp_path):
    check = Check(name="bioimage.io test", measured="passed", threshold="passes", passed=True)
    report = Report(subject="<script>alert(1)</script>", checks=[check], accepted=True)
    page = report.to_html()
    assert "<script>" not in page and "&lt;script&gt;" in page and "ACCEPTED" in page
    assert "data:image/png" not in page
    paths = report.write(tmp_path)
    first = paths.html.read_text()
    report.accepted = False
    assert report.write(tmp_path) == paths and paths.html.read_text() != first  # replaced
    assert json.loads(paths.json.read_text())["accepted"] is False
    assert not list(tmp_path.glob(".*.tmp"))
