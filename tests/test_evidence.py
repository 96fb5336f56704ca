"""Verdicts only from evidence; runs that fail early and leave nothing behind (real CLI runs).

Each case: the exit code, the message, and the files left on disk.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from typer.testing import CliRunner

from tilenorm_bmz.atomic import TMP_TAG, check_writable, remove_stale, temp_sibling
from tilenorm_bmz.checkpoint import save_checkpoint
from tilenorm_bmz.cli import EXIT_BAD_INPUT, EXIT_OK, EXIT_REJECTED, app
from tilenorm_bmz.data import synthetic_blobs
from tilenorm_bmz.models import UNet
from tilenorm_bmz.progress import progress_bar

from .conftest import randomize_norm_stats

runner = CliRunner()


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if TMP_TAG in p.name]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("evidence")
    torch.manual_seed(0)
    brn = randomize_norm_stats(UNet(dims=2, in_channels=1, out_channels=2, depth=2, features=4,
                                    norm="batchrenorm")).eval()
    save_checkpoint(d / "global.pt", brn, input_normalization={"mode": "global"})
    # fixed values fitted on 8-bit training data, as `package --input-norm fixed` records them
    save_checkpoint(d / "fixed8bit.pt", brn, input_normalization={"mode": "fixed", "low": [3.0], "high": [240.0]})
    plain = UNet(dims=2, in_channels=1, out_channels=2, depth=2, features=4, norm="none").eval()
    save_checkpoint(d / "nonorm.pt", plain, input_normalization={"mode": "global"})
    image, _ = synthetic_blobs((128, 128), seed=2)
    np.save(d / "image8.npy", (image * 200).astype("float32"))
    np.save(d / "image16.npy", (33000 + image * 4000).astype("uint16"))  # a 16-bit microscope's range
    nan = (image * 200).astype("float32")
    nan[0, 17, 42] = np.nan
    np.save(d / "nan.npy", nan)
    np.save(d / "tiny.npy", np.ones((1, 6, 6), "float32") * np.arange(6, dtype="float32"))
    return {"dir": d, **{p.stem: p for p in d.iterdir()}}


# -- degenerate inputs: no verdict ------------------------------------------------------------------------
def test_a_fixed_range_that_clips_the_image_gives_no_verdict(files: dict[str, Path], tmp_path: Path) -> None:
    result = run("validate", files["fixed8bit"], "--data", files["image16"], "--out", tmp_path / "r")
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    out = " ".join(result.output.split())
    assert "no verdict" in out and "fixed normalization range [3.0]..[240.0]" in out
    assert "--input-norm percentile" in out
    raw = np.load(files["image16"])
    assert f"range {raw.min():g}..{raw.max():g}" in out  # the data's range is named
    assert "recalibrate" not in out and "REJECTED" not in out


def test_the_report_shows_what_the_network_received(files: dict[str, Path], tmp_path: Path) -> None:
    import json

    result = run("validate", files["global"], "--data", files["image16"], "--out", tmp_path / "r", "--skip",
                 "consumers", "--skip", "sweep")
    assert result.exit_code in (EXIT_OK, EXIT_REJECTED), result.output
    (image,) = json.loads((tmp_path / "r" / "report.json").read_text())["extra"]["gate"]["images"]
    received = image["received"]
    raw = np.load(files["image16"])
    assert received["raw_min"] == [float(raw.min())] and received["raw_max"] == [float(raw.max())]
    assert received["min"][0] == 0.0 and received["max"][0] == 1.0
    assert received["constant"] is False and max(received["clipped_high"]) <= 0.05
    assert "-> network input 0..1" in result.output  # next to the verdict, in the terminal
    assert "received: raw" in (tmp_path / "r" / "report.html").read_text()  # and in the HTML report


def test_nan_voxels_give_no_verdict_with_their_position(files: dict[str, Path], tmp_path: Path) -> None:
    result = run("validate", files["global"], "--data", files["nan"], "--out", tmp_path / "r")
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert "no verdict" in result.output and "(0, 17, 42)" in result.output


def test_a_too_small_image_gives_no_verdict_and_the_size_that_works(files: dict[str, Path], tmp_path: Path) -> None:
    result = run("validate", files["global"], "--data", files["tiny"], "--out", tmp_path / "r")
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    out = " ".join(result.output.split())
    assert "no verdict" in out and "tile mismatch could not be measured" in out and "at least" in out
    assert "ACCEPTED" not in out


def test_seams_of_a_norm_free_network_are_blamed_on_its_halo(files: dict[str, Path], tmp_path: Path) -> None:
    result = run("validate", files["nonorm"], "--data", files["image8"], "--halo", "1", "--out", tmp_path / "r",
                 "--skip", "sweep")
    assert result.exit_code == EXIT_REJECTED, result.output
    import json

    checks = json.loads((tmp_path / "r" / "report.json").read_text())["checks"]
    (mismatch,) = [c for c in checks if c["name"] == "tile mismatch"]
    assert mismatch["status"] == "failed"
    assert "below the measured one-sided receptive field" in mismatch["advice"]
    advice = " ".join(c["advice"] for c in checks)
    assert "the network normalizes per tile" not in advice and "couple the tile" not in advice
    assert "BatchRenorm" not in advice


# -- non-finite input and weights ------------------------------------------------------------------------------
def test_predict_refuses_nan_input_or_fills_it(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "pred.npy"
    result = run("predict", files["global"], files["nan"], "-o", out)
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert "1 NaN/Inf voxel(s)" in result.output and "(0, 17, 42)" in result.output
    assert "--fill-nonfinite" in result.output and not out.exists() and not _leftovers(tmp_path)
    result = run("predict", files["global"], files["nan"], "-o", out, "--fill-nonfinite", "0")
    assert result.exit_code == EXIT_OK, result.output
    assert np.isfinite(np.load(out)).all()


def test_nan_weights_are_refused_at_load(files: dict[str, Path], tmp_path: Path) -> None:
    net = UNet(dims=2, in_channels=1, out_channels=2, depth=2, features=4, norm="batchrenorm").eval()
    with torch.no_grad():
        next(net.parameters())[0] = float("nan")
    save_checkpoint(tmp_path / "nan.pt", net, input_normalization={"mode": "global"})
    for args in (["predict", tmp_path / "nan.pt", files["image8"], "-o", tmp_path / "p.npy"],
                 ["validate", tmp_path / "nan.pt", "--data", files["image8"], "--out", tmp_path / "r"],
                 ["package", tmp_path / "nan.pt", "-o", tmp_path / "p.zip", "--sample", files["image8"],
                  "--author", "A. Dev", "--skip-gate"],
                 ["halo", tmp_path / "nan.pt"]):
        result = run(*args)
        assert result.exit_code == EXIT_BAD_INPUT, result.output
        assert "NaN/Inf value(s)" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "p.npy").exists() and not (tmp_path / "p.zip").exists()


# -- outputs checked before any work -----------------------------------------------------------------------------
def test_unwritable_outputs_are_refused_before_work(files: dict[str, Path], tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cases = {
        "predict": ["predict", files["global"], files["image8"], "-o", blocker / "pred.tif"],
        "validate": ["validate", files["global"], "--data", files["image8"], "--out", blocker / "report"],
        "package": ["package", files["global"], "-o", blocker / "m.zip", "--sample", files["image8"]],
        "convert": ["convert", files["global"], "-o", blocker / "brn.pt"],
        "train": ["train", "--example", "2d"],  # replaced below: needs a config
    }
    config = tmp_path / "train.yaml"
    config.write_text(run("train", "--example", "2d").output)
    cases["train"] = ["train", config, "--out", blocker / "run"]
    for name, args in cases.items():
        started = time.perf_counter()
        result = run(*args)
        assert result.exit_code == EXIT_BAD_INPUT, (name, result.output)
        assert "a_file is a file" in result.output, (name, result.output)
        assert time.perf_counter() - started < 30  # refused up front, not after the work (a loose bound)


def test_a_read_only_folder_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # root may write anywhere, so the permission answer is what os.access says
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(ValueError, match="not writable"):
        check_writable(tmp_path / "out.zip")


# -- train overrides are validated like the YAML ------------------------------------------------------------
def test_train_steps_override_is_validated(tmp_path: Path) -> None:
    config = tmp_path / "train.yaml"
    config.write_text(run("train", "--example", "2d").output)
    result = run("train", config, "--out", tmp_path / "run", "--steps", "-5")
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert "steps" in result.output and "greater than or equal to 1" in result.output
    assert not (tmp_path / "run" / "last.pt").exists()


def test_resume_with_steps_below_the_checkpoint_says_so(tmp_path: Path) -> None:
    from .test_train import tiny_config

    cfg = tiny_config(2, steps=4)
    cfg.to_yaml(tmp_path / "train.yaml")
    assert run("train", tmp_path / "train.yaml", "--out", tmp_path / "run").exit_code == EXIT_OK
    result = run("train", "--resume", tmp_path / "run" / "last.pt", "--out", tmp_path / "run", "--steps", "2")
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert "at step 4 already" in result.output and "--steps above 4" in result.output


# -- temporary outputs: cleaned on SIGTERM, stale ones removed, shared modes ------------------------------------
def test_sigterm_during_predict_leaves_nothing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = UNet(dims=3, in_channels=1, out_channels=2, depth=2, features=8, norm="batchrenorm").eval()
    save_checkpoint(tmp_path / "m.pt", net, input_normalization={"mode": "global"})
    tifffile.imwrite(tmp_path / "vol.tif", np.random.default_rng(0).random((96, 160, 160), dtype="float32"))
    out = tmp_path / "pred.zarr"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tilenorm_bmz.cli", "predict", str(tmp_path / "m.pt"), str(tmp_path / "vol.tif"),
         "-o", str(out), "--tile", "64,64,64", "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while not _leftovers(tmp_path) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        if not _leftovers(tmp_path):
            proc.kill()
            raise AssertionError(f"the prediction never started writing: {proc.communicate()[0].decode()[-2000:]}")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 128 + signal.SIGTERM, proc.stdout.read().decode() if proc.stdout else ""
    assert not out.exists() and not _leftovers(tmp_path)


def test_stale_temporaries_of_dead_runs_are_removed(tmp_path: Path) -> None:
    target = tmp_path / "model.zip"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ours = temp_sibling(target)
    stale = ours.with_name(ours.name.replace(f"-{os.getpid()}-", f"-{dead.pid}-"))
    stale.write_bytes(b"half a package")
    ours.write_bytes(b"being written by this process")
    other_host = tmp_path / f".model.zip.{TMP_TAG}-elsewhere-{dead.pid}-00000000"
    other_host.write_bytes(b"another machine's run on shared storage")
    assert remove_stale(target) == [stale]
    assert ours.exists() and other_host.exists() and not stale.exists()


def test_checkpoints_are_written_with_the_umask_mode(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "m.pt", UNet(dims=2, features=4, depth=2))
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o644
    from tilenorm_bmz.config import atomic_write_text
    from tilenorm_bmz.data import write_tiff

    old = os.umask(0o022)
    try:
        text = atomic_write_text(tmp_path / "notes.md", "shared")
        tif = write_tiff(tmp_path / "pred.tif", np.zeros((1, 8, 8), "float32"))
    finally:
        os.umask(old)
    assert {(p.stat().st_mode & 0o777) for p in (text, tif)} == {0o644}


# -- progress in logs -----------------------------------------------------------------------------------------
def test_progress_is_plain_lines_when_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    with progress_bar(True, 3, "tiles") as advance:
        for _ in range(3):
            advance(info="loss 0.401 | disparity 0.000")
    err = capsys.readouterr().err
    assert "tiles: 3/3  loss 0.401 | disparity 0.000" in err
    assert "…" not in err
