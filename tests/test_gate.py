"""The validation gate: accept/reject decisions, consumer emulation, exit codes, reports, --record, package hook."""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from typer.testing import CliRunner

from tilenorm_bmz.bmz import GateInputError, export_package, read_package_model, validate_package
from tilenorm_bmz.bmz._yaml import dump_yaml, load_yaml
from tilenorm_bmz.bmz.consumers import _ilastik_blocks, emulate_bioimageio_core, ilastik_tile_shape
from tilenorm_bmz.bmz.subject import PackageAxes, _AxisAdapter, load_subject
from tilenorm_bmz.checkpoint import save_checkpoint
from tilenorm_bmz.cli import app
from tilenorm_bmz.config import ExportConfig, GateConfig, InputNormalization
from tilenorm_bmz.data import fit_normalization
from tilenorm_bmz.models import UNet
from tilenorm_bmz.norm import calibrate_norm

from .test_bmz_export import blobs

pytestmark = pytest.mark.bmz

NORM = {"mode": "global", "lower": 0.01, "upper": 0.98}
CFG = ExportConfig(authors=[{"name": "Test Author"}], name="Tiny gate test net")
#: Checks that need no bioimage.io test run (the slow part) for the decisions tested below.
FAST = GateConfig(checks=["tile_mismatch", "disparity", "tiled_vs_whole", "consumers", "halo"])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rdf_of(package: Path) -> dict:
    with zipfile.ZipFile(package) as zf:
        return load_yaml(zf.read("rdf.yaml"))


def normalized(raw: np.ndarray) -> np.ndarray:
    return fit_normalization(InputNormalization(**NORM), raw[None]).apply(raw[None])


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return blobs((96, 104))


@pytest.fixture(scope="module")
def brn_checkpoint(tmp_path_factory: pytest.TempPathFactory, image: np.ndarray) -> Path:
    """A tiny 2D BatchRenorm U-Net whose running statistics are calibrated on the data (as after training)."""
    torch.manual_seed(0)
    net = UNet(dims=2, depth=1, features=4, norm="batchrenorm").eval()
    calibrate_norm(net, [torch.from_numpy(normalized(image))[None]])
    return save_checkpoint(tmp_path_factory.mktemp("brn") / "brn.pt", net, input_normalization=NORM)


@pytest.fixture(scope="module")
def brn_package(tmp_path_factory: pytest.TempPathFactory, brn_checkpoint: Path, image: np.ndarray) -> Path:
    folder = tmp_path_factory.mktemp("pkg")
    return export_package(brn_checkpoint, folder / "brn.zip", export_config=CFG, sample=image, test=False).package


@pytest.fixture(scope="module")
def accepted_run(tmp_path_factory: pytest.TempPathFactory, brn_package: Path, image: np.ndarray) -> dict:
    """``tilenorm-bmz validate`` on the BatchRenorm package: full gate, collection format, --record."""
    folder = tmp_path_factory.mktemp("accepted")
    data = folder / "image.tif"
    tifffile.imwrite(data, image)
    siblings = sorted(p.name for p in brn_package.parent.iterdir())
    before = sha256(brn_package)
    result = CliRunner().invoke(app, [
        "validate", str(brn_package), "--data", str(data), "--out", str(folder / "out"), "--report-format",
        "collection", "--record", str(folder / "recorded.zip"), "--device", "cpu",
    ])
    return {"result": result, "folder": folder, "before": before, "siblings": siblings,
            "report": json.loads((folder / "out" / "report.json").read_text())}


# -- decisions ----------------------------------------------------------------------------------------------
def test_batchrenorm_package_accepted_with_max_dist_zero(accepted_run: dict) -> None:
    result, report = accepted_run["result"], accepted_run["report"]
    assert result.exit_code == 0, result.output
    assert "ACCEPTED" in result.output
    assert report["accepted"] is True and report["failed_checks"] == []
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["bioimage.io test"]["status"] == "passed"
    assert checks["tile mismatch"]["measured"] == 0.0
    assert report["results"]["tile_mismatch"]["max_dist"] == 0.0
    assert report["results"]["tile_mismatch"]["seamless"] is True
    assert checks["halo sufficiency"]["status"] == "passed"
    assert checks["train/eval disparity"]["status"] == "passed"
    for name in ("tiled vs whole (tilenorm-bmz)", "seams in bioimageio.core"):
        assert checks[name]["status"] == "passed" and checks[name]["measured"] <= 1e-4
    # per-image percentiles are computed per tile in ilastik: flagged with the fix, reported, not gating
    ilastik = checks["seams in ilastik"]
    assert ilastik["status"] == "info" and ilastik["measured"] > 1e-4
    assert "--input-norm fixed" in ilastik["advice"]
    consumers = {c["consumer"]: c for c in report["extra"]["gate"]["consumers"]}
    assert consumers["ilastik"]["settings"]["tile_shape"] == [512, 512]  # ilastik's rule: min + n*step >= 512
    assert consumers["bioimageio.core"]["settings"]["pad_mode"] == "symmetric"
    html = (accepted_run["folder"] / "out" / "report.html").read_text()
    assert "ACCEPTED" in html and "data:image/png;base64," in html and "<script" not in html


def test_validate_never_modifies_the_package(accepted_run: dict, brn_package: Path) -> None:
    assert sha256(brn_package) == accepted_run["before"]
    assert sorted(p.name for p in brn_package.parent.iterdir()) == accepted_run["siblings"]


def test_instancenorm_network_rejected_for_tile_mismatch(tmp_path: Path, image: np.ndarray) -> None:
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "in.pt", UNet(dims=2, depth=1, features=4, norm="instancenorm").eval(),
                           input_normalization=NORM)
    report = validate_package(ckpt, image, config=FAST, out_dir=tmp_path / "out")
    assert not report.accepted and report.exit_code == 1
    assert {"tile mismatch", "halo sufficiency"} <= set(report.failed_checks)
    mismatch = next(c for c in report.checks if c.name == "tile mismatch")
    assert mismatch.measured > 1e-4
    assert "BatchRenorm" in mismatch.advice and "`tilenorm-bmz convert`" in mismatch.advice
    halo = next(c for c in report.checks if c.name == "halo sufficiency")
    assert halo.measured == "normalization couples the tile"
    assert json.loads(report.report_json.read_text())["accepted"] is False


def test_batchnorm_with_batch1_statistics_shows_disparity(tmp_path: Path, image: np.ndarray) -> None:
    """Running statistics averaged over single-tile batches of varied images (what batch-1 training keeps)."""
    torch.manual_seed(0)
    net = UNet(dims=2, depth=1, features=4, norm={"kind": "batchnorm", "momentum": None}).train()
    rng = np.random.default_rng(1)
    with torch.no_grad():
        for i in range(8):
            tile = blobs((48, 48), seed=10 + i) * rng.uniform(0.3, 3.0) + rng.uniform(0, 300)
            net(torch.from_numpy(normalized(tile))[None])
    ckpt = save_checkpoint(tmp_path / "bn.pt", net.eval(), input_normalization=NORM)
    report = validate_package(ckpt, image, config=GateConfig(checks=["disparity"]))
    assert report.failed_checks == ["train/eval disparity"]
    assert report.disparity is not None and report.disparity.max_disparity > 0.05
    assert "1 tile" in report.disparity.batch_composition
    check = report.checks[-1]
    assert "--calibrate" in check.advice or "--finetune" in check.advice


def test_too_small_halo_rejected_for_halo_sufficiency(tmp_path: Path, brn_checkpoint: Path, image: np.ndarray,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="tilenorm_bmz"):
        small = export_package(brn_checkpoint, tmp_path / "small.zip", export_config=CFG, sample=image, halo=2,
                               test=False)
    assert any("below the measured receptive field" in r.message for r in caplog.records)
    report = validate_package(small.package, image, config=GateConfig(checks=["halo", "tile_mismatch"]))
    assert not report.accepted and "halo sufficiency" in report.failed_checks
    halo = next(c for c in report.checks if c.name == "halo sufficiency")
    assert halo.measured == "y: 9, x: 9" and "increase the halo to 9x9" in halo.advice
    assert report.halo_used == (2, 2)


def test_invalid_description_is_rejected_with_the_reason(tmp_path: Path, brn_package: Path) -> None:
    rdf = rdf_of(brn_package)
    rdf["inputs"][0]["axes"][2]["size"] = {"min": 20, "step": -2}  # not a valid parameterized size
    broken = tmp_path / "broken.zip"
    with zipfile.ZipFile(brn_package) as zin, zipfile.ZipFile(broken, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, dump_yaml(rdf) if info.filename == "rdf.yaml" else zin.read(info.filename))
    report = validate_package(broken, config=FAST, out_dir=tmp_path / "out")
    assert not report.accepted and report.failed_checks == ["bioimage.io format"]
    assert "step" in report.checks[0].advice
    assert (tmp_path / "out" / "report.html").exists()


# -- exit code 2: inputs the gate cannot run on -------------------------------------------------------------
def test_corrupt_zip_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "model.zip"
    bad.write_bytes(b"PK\x03\x04 this is not a whole zip file")
    result = CliRunner().invoke(app, ["validate", str(bad), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "corrupt" in result.output and "model.zip" in result.output


def with_weights(package: Path, weights: dict, output: Path, extra: dict[str, bytes] | None = None) -> Path:
    """A copy of ``package`` whose rdf declares only ``weights`` (plus ``extra`` files)."""
    rdf = rdf_of(package)
    rdf["weights"] = weights
    with zipfile.ZipFile(package) as zin, zipfile.ZipFile(output, "w") as zout:
        for info in zin.infolist():
            if info.filename != "rdf.yaml":
                zout.writestr(info, zin.read(info.filename))
        zout.writestr("rdf.yaml", dump_yaml(rdf))
        for name, data in (extra or {}).items():
            zout.writestr(name, data)
    return output


def test_torchscript_only_package(tmp_path: Path, brn_package: Path, image: np.ndarray) -> None:
    torchscript = {k: v for k, v in rdf_of(brn_package)["weights"]["torchscript"].items() if k != "parent"}
    package = with_weights(brn_package, {"torchscript": torchscript}, tmp_path / "ts.zip")
    report = validate_package(package, image, config=FAST)
    assert report.accepted, report.summary()
    assert report.weights_format == "torchscript"
    assert report.disparity is not None and report.disparity.applicable  # a scripted module keeps train mode
    assert report.tile_mismatch is not None and report.tile_mismatch.max_dist == 0.0


def test_package_without_pytorch_weights_exit_2_not_applicable(tmp_path: Path, brn_package: Path) -> None:
    keras_only = with_weights(brn_package, {"keras_hdf5": {"source": "weights.h5", "tensorflow_version": "2.15"}},
                              tmp_path / "keras_only.zip", {"weights.h5": b"not used"})
    result = CliRunner().invoke(app, ["validate", str(keras_only), "--out", str(tmp_path / "out"),
                                      "--report-format", "collection"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "no PyTorch or ONNX weights" in text and "keras_hdf5" in text
    (collection,) = (tmp_path / "out").glob("tilenorm-bmz_*.json")
    content = json.loads(collection.read_text())
    assert content["status"] == "not-applicable" and "no PyTorch or ONNX weights" in content["details"]


def test_package_with_broken_onnx_weights_exit_2(tmp_path: Path, brn_package: Path) -> None:
    onnx_only = with_weights(brn_package, {"onnx": {"source": "weights.onnx", "opset_version": 17}},
                             tmp_path / "onnx_only.zip", {"weights.onnx": b"not an onnx graph"})
    result = CliRunner().invoke(app, ["validate", str(onnx_only), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "onnx weights could not be loaded" in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_wrong_channel_count_exit_2(tmp_path: Path, brn_package: Path, image: np.ndarray) -> None:
    two = tmp_path / "two_channels.npy"
    np.save(two, np.stack([image, image]))
    result = CliRunner().invoke(app, ["validate", str(brn_package), "--data", str(two), "--axes", "cyx",
                                      "--skip", "bioimageio", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "2 channel(s)" in result.output and "expects 1" in result.output
    with pytest.raises(GateInputError, match=r"2D and needs \(1, Y, X\)"):
        validate_package(brn_package, np.zeros((2, 4, 64, 64), np.float32), config=FAST)


def test_labels_that_do_not_fit_are_refused(brn_package: Path, image: np.ndarray) -> None:
    with pytest.raises(GateInputError, match="spatial shape"):
        validate_package(brn_package, image, np.zeros((50, 50), np.int32), config=FAST)


# -- reports, --record ----------------------------------------------------------------------------------------
def test_collection_report_format(accepted_run: dict) -> None:
    (path,) = (accepted_run["folder"] / "out").glob("tilenorm-bmz_*.json")
    content = json.loads(path.read_text())
    # the dump of bioimage-io/collection's ToolCompatibilityReport (tool and version name the file)
    assert set(content) == {"status", "score", "error", "details", "badge", "links"}
    assert content["status"] == "passed" and content["score"] == 1.0 and content["error"] is None
    assert content["badge"] is None and content["links"] == []
    details = content["details"]
    assert details["status"] == "passed" and "seams in ilastik" in details["warnings"]
    assert {c["name"] for c in details["checks"]} >= {"tile mismatch", "bioimage.io test"}


def test_record_round_trip(accepted_run: dict, brn_package: Path) -> None:
    recorded = accepted_run["folder"] / "recorded.zip"
    assert "recorded the gate figures" in accepted_run["result"].output
    assert "bioimage.io test passed" in accepted_run["result"].output  # the new file was re-tested
    gate = rdf_of(recorded)["config"]["tilenorm_bmz"]["gate"]
    assert gate["status"] == "accepted" and gate["tile_mismatch"]["max_dist"] == 0.0
    assert gate["halo"]["sufficient"] is True and gate["checks"]["tile mismatch"] == "passed"
    with zipfile.ZipFile(brn_package) as a, zipfile.ZipFile(recorded) as b:
        assert set(a.namelist()) == set(b.namelist())
        for name in a.namelist():
            if name != "rdf.yaml":
                assert a.read(name) == b.read(name), name
    original, _, _ = read_package_model(brn_package)
    back, _, extra = read_package_model(recorded)
    for key, value in original.state_dict().items():
        assert torch.equal(value, back.state_dict()[key])
    assert extra["bioimageio"]["tilenorm_bmz"]["gate"]["status"] == "accepted"


def test_record_refused_for_rejected(tmp_path: Path, brn_package: Path) -> None:
    from tilenorm_bmz.bmz import record_gate_results

    report = validate_package(brn_package, config=GateConfig(checks=["halo"]))
    assert report.accepted and any("test input" in w for w in report.warnings)  # no data: a warning
    rejected = report.model_copy(update={"accepted": False})
    with pytest.raises(ValueError, match="only accepted"):
        record_gate_results(brn_package, rejected, tmp_path / "r.zip")
    assert not (tmp_path / "r.zip").exists()


def test_gate_config_yaml_round_trip(tmp_path: Path) -> None:
    cfg = GateConfig(max_dist=0.0, gating_consumers=["tilenorm-bmz", "ilastik"], checks=["tile_mismatch", "halo"],
                     crop_shape=[64, 96], halo=[4, 8], sweep_sizes=[32, 64])
    assert GateConfig.from_yaml(cfg.to_yaml(tmp_path / "gate.yaml")) == cfg
    with pytest.raises(ValueError, match="gating_consumers"):
        GateConfig.model_validate({"gating_consumers": ["ilastic"]})


# -- consumer emulation -------------------------------------------------------------------------------------
def test_ilastik_tile_rule() -> None:
    assert ilastik_tile_shape((20, 20), (2, 2), 2) == (512, 512)
    assert ilastik_tile_shape((24, 40, 40), (8, 8, 8), 3) == (48, 64, 64)  # the smallest n where one axis >= 64
    assert ilastik_tile_shape((600, 16), (16, 16), 2) == (600, 16)


@pytest.mark.parametrize("shape", [(50, 61), (7, 128), (30, 30, 30)])
def test_ilastik_blocks_cover_the_image_once(shape: tuple[int, ...]) -> None:
    tile, halo = (24,) * len(shape), (4,) * len(shape)
    hits = np.zeros(shape, int)
    for roi, read, pad, local in _ilastik_blocks(shape, tile, halo):
        hits[roi] += 1
        for r, p, loc, t in zip(read, pad, local, tile, strict=True):
            assert (r.stop - r.start) + p[0] + p[1] == t  # every request is extended to the tile shape
            assert loc.start >= 0 and loc.stop <= t
    assert (hits == 1).all()


def test_core_emulation_region_and_block_size(brn_package: Path, image: np.ndarray) -> None:
    subject = load_subject(brn_package, GateConfig())
    m, st, h = subject.size_min[0], subject.size_step[0], subject.declared_halo[0]
    odd = np.pad(image, ((0, 1), (0, 27)), mode="reflect")[None]  # 97 x 131: not a valid whole sample
    run = emulate_bioimageio_core(subject, odd, blocksize=0, device="cpu")  # n = 0 is not replaced by 10
    assert run.applicable and run.settings["blocksize_parameter"] == 0
    assert run.settings["block_shape"] == [m, m]
    for start, stop in run.settings["region"]:
        size = stop - start
        assert (size + 2 * h - m) % st == 0  # a size bioimageio.core accepts as a whole sample
    assert all(g >= 2 for g in run.settings["grid"])  # at least two blocks per axis: seams to find
    assert run.result is not None and run.result.max_abs_diff <= 1e-4
    tiny = emulate_bioimageio_core(subject, np.zeros((1, 1, 50), np.float32), device="cpu")
    assert not tiny.applicable and "smaller" in tiny.reason


def test_package_axis_order_adapter() -> None:
    axes = PackageAxes(input=("batch", "y", "x", "channel"), output=("channel", "y", "x"), spatial=("y", "x"))
    x = np.random.default_rng(0).random((1, 2, 5, 7), dtype=np.float32)
    packed = axes.to_package(x)
    assert packed.shape == (1, 5, 7, 2) and np.array_equal(packed[0, :, :, 1], x[0, 1])
    assert axes.from_package(np.zeros((3, 5, 7))).shape == (1, 3, 5, 7)  # output without a batch axis

    class ChannelsLast(torch.nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:  # (1, Y, X, C) -> (C_out, Y, X)
            return t[0].permute(2, 0, 1) * 2

    net = _AxisAdapter(ChannelsLast(), axes)
    y = net(torch.from_numpy(x))
    assert torch.equal(y, torch.from_numpy(x) * 2)


# -- the package hook ---------------------------------------------------------------------------------------
def test_package_refuses_when_the_gate_fails_and_records_skip_gate(tmp_path: Path, brn_checkpoint: Path,
                                                                   image: np.ndarray) -> None:
    sample = tmp_path / "sample.tif"
    tifffile.imwrite(sample, image)
    args = ["package", str(brn_checkpoint), "-o", str(tmp_path / "m.zip"), "--author", "Jane Doe", "--sample",
            str(sample), "--halo", "2"]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 1, refused.output
    assert "halo sufficiency" in refused.output
    assert not (tmp_path / "m.zip").exists() and (tmp_path / "m.rejected.zip").exists()
    assert json.loads((tmp_path / "m.gate" / "report.json").read_text())["accepted"] is False
    skipped = CliRunner().invoke(app, [*args, "--skip-gate"])
    assert skipped.exit_code == 0, skipped.output
    gate = rdf_of(tmp_path / "m.zip")["config"]["tilenorm_bmz"]["gate"]
    assert gate["status"] == "skipped" and "--skip-gate" in gate["reason"]


def test_every_consumer_is_one_registered_module() -> None:
    from tilenorm_bmz.bmz import consumers
    from tilenorm_bmz.config import GATE_CONSUMERS

    assert set(consumers.EMULATIONS) == set(GATE_CONSUMERS) == set(consumers.CONSUMER_LABELS)
    for name, emulation in consumers.EMULATIONS.items():
        module = emulation.__module__.rsplit(".", 1)[-1]
        assert module in ("tiled_predictor", "bioimageio_core", "ilastik", "deepimagej"), (name, module)
    with pytest.raises(ValueError, match="registered twice"):
        consumers.register("ilastik", "again")(consumers.EMULATIONS["ilastik"])


def test_every_check_is_one_registered_part(monkeypatch: pytest.MonkeyPatch, brn_checkpoint: Path,
                                            image: np.ndarray) -> None:
    """The gate's checks come from its parts, in one place: a part added there measures every image and decides."""
    from tilenorm_bmz.bmz import gate
    from tilenorm_bmz.report import Check

    seen: list[tuple[int, ...]] = []

    class Extra:
        def measure(self, run, item, out):
            seen.append(item.image.shape)

        def decide(self, run, measured):
            return [Check(name="extra", measured=len(measured), threshold="1", passed=True)]

    monkeypatch.setattr(gate, "GATE_PARTS", (*gate.GATE_PARTS, Extra()))
    report = validate_package(brn_checkpoint, [image, image], config=GateConfig(checks=["halo"]))
    assert seen == [(1, 96, 104)] * 2 and report.checks[-1].name == "extra" and report.checks[-1].measured == 2
