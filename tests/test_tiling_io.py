"""Out-of-core and distributed tiled prediction, `predict_file`, and the `halo` / `predict` commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch import nn
from typer.testing import CliRunner

from tilenorm_bmz.checkpoint import load_checkpoint, save_checkpoint
from tilenorm_bmz.cli import app
from tilenorm_bmz.config import InputNormalization
from tilenorm_bmz.data import fit_normalization
from tilenorm_bmz.data.io import create_output, open_image
from tilenorm_bmz.models import UNet
from tilenorm_bmz.tiling import TiledPredictor, predict_dask, predict_file

from .conftest import randomize_norm_stats

runner = CliRunner()
HALO = 24


def _unet(dims: int = 2, norm: str = "batchrenorm", **kw) -> UNet:
    return randomize_norm_stats(UNet(dims=dims, features=4, depth=2, norm=norm, **kw)).eval()


def _raw(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).gamma(2.0, 300.0, shape).astype(np.float32)


def _listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


@pytest.fixture
def volume(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A 3D Zarr input (1, 40, 90, 75) with chunks smaller than the image."""
    x = _raw((1, 40, 90, 75))
    z = zarr.open_array(
        str(tmp_path / "in.zarr"), mode="w", shape=x.shape, chunks=(1, 16, 32, 32), dtype="float32"
    )
    z[:] = x
    return tmp_path / "in.zarr", x


def test_out_of_core_zarr_equals_in_memory(volume, tmp_path):
    path, x = volume
    model = _unet(3, pool_factors=[(1, 2, 2), (1, 2, 2)])
    predictor = TiledPredictor(model, (32, 64, 64), (10, HALO, HALO), batch_size=2, device="cpu")
    in_memory = predictor.predict(x)
    image = open_image(path)
    with create_output(
        tmp_path / "out.zarr", (2, 40, 90, 75), chunks=(2, 20, 16, 16), check_alignment=True
    ) as out:
        tiling = predictor.predict_to(image, out)  # check_alignment: every write covers whole chunks
    assert len(tiling) > 4
    result = zarr.open_array(str(tmp_path / "out.zarr"))[:]
    np.testing.assert_allclose(result, in_memory, rtol=1e-5, atol=1e-5 * np.abs(in_memory).max())


def test_dask_workers_give_the_single_process_result(volume, tmp_path):
    distributed = pytest.importorskip("distributed")
    path, _ = volume
    model = _unet(3, pool_factors=[(1, 2, 2), (1, 2, 2)])
    predictor = TiledPredictor(model, (32, 64, 64), (10, HALO, HALO), batch_size=2, device="cpu")
    image = open_image(path)
    shape, chunks = (2, 40, 90, 75), (2, 20, 16, 16)
    with create_output(tmp_path / "single.zarr", shape, chunks=chunks) as out:
        predictor.predict_to(image, out)
    with distributed.Client(
        n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
    ) as client:
        with create_output(tmp_path / "dask.zarr", shape, chunks=chunks, check_alignment=True) as out:
            tiling = predict_dask(predictor, image, out, client=client, blocks_per_task=2)
    assert len(tiling) >= 4
    single = zarr.open_array(str(tmp_path / "single.zarr"))[:]
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "dask.zarr"))[:], single)


def test_predict_file_zarr_tiff_npy_agree_with_the_predictor(tmp_path):
    model = _unet()
    x = _raw((1, 150, 130))
    np.save(tmp_path / "img.npy", x)
    norm = InputNormalization()
    expected = TiledPredictor(model, (64, 64), HALO, device="cpu", preprocess=fit_normalization(norm, x).apply).predict(x)
    scale = np.abs(expected).max()
    blocks = set()
    for name in ("out.zarr", "out.tif", "out.npy"):
        summary = predict_file(
            model,
            tmp_path / "img.npy",
            tmp_path / name,
            tile_shape=(64, 64),
            device="cpu",
            normalization=norm,
        )
        assert summary.halo == (HALO, HALO) and summary.output_shape == (2, 150, 130)
        assert summary.mode == ("out-of-core" if name.endswith("zarr") else "in-memory")
        blocks.add(summary.n_blocks)
        got = np.load(tmp_path / name) if name.endswith(".npy") else open_image(tmp_path / name).read()
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * scale)
    assert _listing(tmp_path) == {"img.npy", "out.zarr", "out.tif", "out.npy"}  # no temporary files left
    # chunk-aligned blocks would need more tiles here: one writer writes parts of chunks instead
    assert len(blocks) == 1


@pytest.mark.parametrize("name", ["out.zarr", "out.npy"])
def test_predict_file_plans_the_tile_from_the_measured_memory(tmp_path, name):
    from tilenorm_bmz.tiling import Tiling

    model = _unet()
    x = _raw((1, 300, 280))
    np.save(tmp_path / "img.npy", x)
    budget = 6 * 2**20
    summary = predict_file(model, tmp_path / "img.npy", tmp_path / name, device="cpu", memory_budget=budget)
    tiling = Tiling((300, 280), summary.tile_shape, summary.halo, summary.divisor)
    assert summary.n_blocks == len(tiling) > 1 and summary.overhead == pytest.approx(tiling.overhead)
    assert summary.plan is not None and "bytes/voxel" in summary.plan and "overhead" in summary.plan
    expected = TiledPredictor(model, summary.tile_shape, summary.halo, device="cpu").predict(x)
    got = np.load(tmp_path / name) if name.endswith(".npy") else open_image(tmp_path / name).read()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


class _FailsAfter(nn.Module):
    """A pointwise network that raises on its third call (a failure in the middle of a prediction)."""

    dims = 2
    in_channels = 1
    out_channels = 1

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("boom")
        return self.conv(x)


@pytest.mark.parametrize("name", ["out.zarr", "out.tif"])
def test_failure_leaves_no_output(tmp_path, name):
    np.save(tmp_path / "img.npy", _raw((1, 200, 200)))
    with pytest.raises(RuntimeError, match="boom"):
        predict_file(
            _FailsAfter(), tmp_path / "img.npy", tmp_path / name, tile_shape=(32, 32), halo=0, device="cpu"
        )
    assert _listing(tmp_path) == {"img.npy"}


# -- CLI ------------------------------------------------------------------------------------------------
@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    return save_checkpoint(tmp_path / "model.pt", _unet(), input_normalization={"mode": "global"})


def test_cli_halo_table_and_json(checkpoint):
    result = runner.invoke(app, ["halo", str(checkpoint), "--samples", "2"])
    assert result.exit_code == 0, result.output
    assert "recommended halo per side" in " ".join(result.output.split()) and "agree" in result.output
    result = runner.invoke(app, ["halo", str(checkpoint), "--json", "--samples", "2"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["recommended_halo"] == [24, 24] and report["theoretical"] == [23, 23]
    assert report["normalization_couples_tile"] is False


def test_cli_predict_matches_the_library(checkpoint, tmp_path):
    x = _raw((1, 150, 130))
    np.save(tmp_path / "img.npy", x)
    result = runner.invoke(
        app,
        [
            "predict",
            str(checkpoint),
            str(tmp_path / "img.npy"),
            "-o",
            str(tmp_path / "pred.zarr"),
            "--tile",
            "64,64",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["halo"] == [24, 24] and summary["normalization"]["settings"]["mode"] == "global"
    model, _ = load_checkpoint(checkpoint)
    expected = TiledPredictor(
        model, (64, 64), HALO, device="cpu", preprocess=fit_normalization(InputNormalization(), x).apply
    ).predict(x)
    got = zarr.open_array(str(tmp_path / "pred.zarr"))[:]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize(
    "setup, args, message",
    [
        ("two_channels", ["--axes", "cyx"], "expects 1 input channel(s) but"),
        ("image", ["--tile", "40,40"], "use a tile of at least 52"),
        ("image", ["--halo", "24,24,24"], "halo has 3 axes"),
        ("exists", [], "exists; choose another output or pass --overwrite"),
        ("unreadable", [], "cannot read it"),
        ("volume", [], "the network is 2D but"),
    ],
)
def test_cli_predict_bad_input_exits_2_and_writes_nothing(checkpoint, tmp_path, setup, args, message):
    inp = tmp_path / ("img.tif" if setup == "unreadable" else "img.npy")
    if setup == "unreadable":
        inp.write_bytes(b"not a tiff")
    else:
        shape = {
            "two_channels": (2, 64, 64),
            "image": (1, 64, 64),
            "exists": (1, 64, 64),
            "volume": (1, 8, 64, 64),
        }
        np.save(inp, _raw(shape[setup]))
    out = tmp_path / "pred.zarr"
    if setup == "exists":
        out.mkdir()
    before = _listing(tmp_path)
    result = runner.invoke(app, ["predict", str(checkpoint), str(inp), "-o", str(out), *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert _listing(tmp_path) == before


def test_cli_predict_refuses_a_state_dict(tmp_path):
    torch.save(_unet().state_dict(), tmp_path / "weights.pt")
    np.save(tmp_path / "img.npy", _raw((1, 64, 64)))
    result = runner.invoke(
        app,
        ["predict", str(tmp_path / "weights.pt"), str(tmp_path / "img.npy"), "-o", str(tmp_path / "p.tif")],
    )
    assert result.exit_code == 2 and "convert it first" in result.output


@pytest.mark.slow
def test_cli_predict_with_local_worker_processes_equals_single_process(checkpoint, tmp_path):
    np.save(tmp_path / "img.npy", _raw((1, 200, 170)))
    common = ["predict", str(checkpoint), str(tmp_path / "img.npy"), "--tile", "64,64", "--device", "cpu"]
    single = runner.invoke(app, [*common, "-o", str(tmp_path / "single.zarr")])
    assert single.exit_code == 0, single.output
    multi = runner.invoke(app, [*common, "-o", str(tmp_path / "multi.zarr"), "--workers", "2"])
    assert multi.exit_code == 0, multi.output
    np.testing.assert_array_equal(
        zarr.open_array(str(tmp_path / "multi.zarr"))[:], zarr.open_array(str(tmp_path / "single.zarr"))[:]
    )


@pytest.mark.bmz
def test_cli_halo_and_predict_on_a_package(checkpoint, tmp_path):
    from tilenorm_bmz.bmz import export_package
    from tilenorm_bmz.config import ExportConfig

    x = _raw((1, 96, 80))
    cfg = ExportConfig(authors=[{"name": "Test Author", "affiliation": "Test Lab"}])
    package = export_package(checkpoint, tmp_path / "model.zip", export_config=cfg, sample=x[0]).package
    result = runner.invoke(app, ["halo", str(package), "--json", "--samples", "2"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["recommended_halo"] == [24, 24]
    np.save(tmp_path / "img.npy", _raw((1, 150, 130)))
    for model, out in ((package, "from_package.tif"), (checkpoint, "from_checkpoint.tif")):
        result = runner.invoke(
            app,
            ["predict", str(model), str(tmp_path / "img.npy"), "-o", str(tmp_path / out), "--tile", "64,64"],
        )
        assert result.exit_code == 0, result.output
    a, b = (
        open_image(tmp_path / "from_package.tif").read(),
        open_image(tmp_path / "from_checkpoint.tif").read(),
    )
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
