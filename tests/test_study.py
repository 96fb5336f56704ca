"""`tilenorm-bmz study` end to end on a tiny budget, and its config rules."""

from __future__ import annotations

import json

import pytest
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from tilenorm_bmz.cli import app
from tilenorm_bmz.study import PAPER_VARIANTS, StudyConfig, variant_config

runner = CliRunner()

TINY = {
    "out_dir": "runs",
    "report": "STUDY.md",
    "variants": [
        {"name": "batchnorm", "norm": "batchnorm"},
        {"name": "batchrenorm", "norm": "batchrenorm"},
        {"name": "instancenorm-tilewise", "norm": "instancenorm", "input_normalization": "tilewise"},
    ],
    "datasets": [
        {
            "name": "synth2d",
            "train": {
                "model": {"dims": 2, "features": 4, "depth": 2},
                "data": {"sample": "synthetic", "tile_shape": [48, 48], "synthetic": {"shape": [128, 192]}},
                "schedule": {"warmup_steps": 2, "ramp_steps": 2},
                "steps": 4,
                "grad_accumulation": 1,
                "batch_size": 2,
                "validate_every": 4,
                "device": "cpu",
            },
            "budgets": {"cpu": {"steps": 3}, "gpu": {"steps": 50, "tile_shape": [64, 64]}},
            "measure": {"max_crops": 2, "disparity_tiles": 2, "sweep_sizes": [64, 128]},
        }
    ],
}


def test_study_runs_end_to_end_and_reuses_finished_runs(tmp_path) -> None:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(TINY))
    result = runner.invoke(app, ["study", str(path), "--budget", "cpu"])
    assert result.exit_code == 0, result.output
    report = (tmp_path / "STUDY.md").read_text()
    assert "| norm | input norm | Dice eval | Dice train mode | disparity | tile mismatch |" in report
    rows = [ln for ln in report.splitlines() if ln.startswith(("| batch", "| instance"))]
    assert len(rows) == 3
    bn = json.loads((tmp_path / "runs" / "synth2d" / "batchrenorm" / "measure.json").read_text())
    assert bn["steps"] == 3 and bn["max_dist"] == 0.0 and bn["budget"] == "cpu"
    assert "| batchrenorm | global |" in report and "| no |" in report  # seamless
    tw = json.loads((tmp_path / "runs" / "synth2d" / "instancenorm-tilewise" / "measure.json").read_text())
    assert tw["disparity"] is None and tw["max_dist"] > 0  # tile-wise normalization: seams
    assert (tmp_path / "STUDY_figures" / "synth2d_sweep.png").exists()
    assert (tmp_path / "STUDY_figures" / "synth2d_batchrenorm_mismatch.png").exists()
    ckpt = tmp_path / "runs" / "synth2d" / "batchnorm" / "last.pt"
    before = ckpt.stat().st_mtime_ns
    result = runner.invoke(app, ["study", str(path), "--budget", "cpu", "--variant", "batchnorm"])
    assert result.exit_code == 0, result.output
    assert ckpt.stat().st_mtime_ns == before  # reused, not retrained
    result = runner.invoke(app, ["study", str(path), "--report-only", "--budget", "cpu"])
    assert result.exit_code == 0 and "wrote" in result.output


def test_unknown_selection_and_changed_config_are_errors(tmp_path) -> None:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(TINY))
    result = runner.invoke(app, ["study", str(path), "--dataset", "nope"])
    assert result.exit_code == 2 and "unknown dataset" in result.output


def test_budgets_change_the_training_config() -> None:
    cfg = StudyConfig.model_validate(TINY)
    ds = cfg.datasets[0]
    cpu = variant_config(ds, cfg.variants[1], "cpu")
    gpu = variant_config(ds, cfg.variants[1], "gpu")
    assert cpu.steps == 3 and gpu.steps == 50 and gpu.data.tile_shape == (64, 64)
    assert cpu.model.norm.kind == "batchrenorm"
    tw = variant_config(ds, cfg.variants[2], "cpu")
    assert tw.data.input_normalization.mode == "tilewise" and tw.model.norm.kind == "instancenorm"


def test_default_variants_are_the_papers() -> None:
    cfg = StudyConfig.model_validate({"datasets": TINY["datasets"]})
    assert [v.name for v in cfg.variants] == [v.name for v in PAPER_VARIANTS]
    assert {(v.norm, v.input_normalization) for v in cfg.variants} == {
        ("batchnorm", "global"), ("instancenorm", "global"), ("batchrenorm", "global"), ("none", "global"),
        ("batchnorm", "tilewise"), ("instancenorm", "tilewise"),
    }


def test_duplicate_names_rejected() -> None:
    bad = dict(TINY, variants=[{"name": "a", "norm": "batchnorm"}, {"name": "a", "norm": "none"}])
    with pytest.raises(ValidationError, match="repeated"):
        StudyConfig.model_validate(bad)


def test_repository_study_config_is_valid() -> None:
    from pathlib import Path

    cfg = StudyConfig.from_yaml(Path(__file__).resolve().parents[1] / "model_zoo" / "study.yaml")
    for ds in cfg.datasets:
        for v in cfg.variants:
            for budget in ("cpu", "gpu"):
                variant_config(ds, v, budget)


def test_batchnorm_in_train_mode_with_batch_one_is_instancenorm() -> None:
    """The fact STUDY.md states when BatchNorm's train-mode Dice equals InstanceNorm's: same weights, same output."""
    import torch

    from tilenorm_bmz.models import UNet

    torch.manual_seed(0)
    bn = UNet(dims=2, in_channels=1, out_channels=2, depth=1, features=4, norm="batchnorm")
    inorm = UNet(dims=2, in_channels=1, out_channels=2, depth=1, features=4, norm="instancenorm")
    inorm.load_state_dict(bn.state_dict(), strict=False)  # IN has no running buffers
    x = torch.rand(1, 1, 32, 32)
    bn.train()
    inorm.eval()
    torch.testing.assert_close(bn(x), inorm(x), rtol=1e-5, atol=1e-6)
    bn.eval()
    assert not torch.allclose(bn(x), inorm(x), atol=1e-3)


def test_twin_note_only_when_the_figures_match() -> None:
    from types import SimpleNamespace

    from tilenorm_bmz.study import _batchnorm_instancenorm_twins

    def row(norm: str, train: list[float], evl: list[float]) -> SimpleNamespace:
        return SimpleNamespace(norm=norm, input_normalization="global", dice_train=train, dice_eval=evl)

    same = [row("batchnorm", [0.9, 0.4], [0.95, 0.5]), row("instancenorm", [0.9, 0.4], [0.9, 0.4])]
    assert _batchnorm_instancenorm_twins(same) == ["global"]
    other = [row("batchnorm", [0.9, 0.4], [0.95, 0.5]), row("instancenorm", [0.8, 0.4], [0.8, 0.4])]
    assert _batchnorm_instancenorm_twins(other) == []


def test_report_from_the_repository_measurements_explains_the_twins(tmp_path) -> None:
    """The report is written from measure.json + metrics.csv alone (here: the committed 2D BatchNorm/InstanceNorm)."""
    import shutil
    from pathlib import Path

    from tilenorm_bmz.study import write_study_report

    zoo = Path(__file__).resolve().parents[1] / "model_zoo"
    cfg = StudyConfig.from_yaml(zoo / "study.yaml")
    cfg = cfg.model_copy(update={
        "datasets": [d for d in cfg.datasets if d.name == "nuclei2d"],
        "variants": [v for v in cfg.variants if v.name in ("batchnorm", "instancenorm")],
        "out_dir": tmp_path / "study", "report": tmp_path / "STUDY.md",
    })
    for v in ("batchnorm", "instancenorm"):
        run = tmp_path / "study" / "nuclei2d" / v
        run.mkdir(parents=True)
        for name in ("measure.json", "metrics.csv"):
            shutil.copy(zoo / "study" / "nuclei2d" / v / name, run / name)
    text = write_study_report(cfg, budget="cpu").read_text()
    assert "| batchnorm | global |" in text and "| instancenorm | global |" in text
    assert "BatchNorm's train-mode Dice equals InstanceNorm's Dice exactly (global input normalization)" in text
    assert (tmp_path / "STUDY_figures" / "nuclei2d_sweep.png").exists()


def _seeded(tmp_path) -> dict:
    """TINY with two seeds of two variants (a shorter budget) and an independent 16-bit volume's planes."""
    import tifffile

    from tilenorm_bmz.data import synthetic_blobs

    image, labels = synthetic_blobs((4, 96, 80), seed=5, dtype="uint16")
    kw = {"photometric": "minisblack", "metadata": {"axes": "ZYX"}}
    tifffile.imwrite(tmp_path / "other.tif", image[0], **kw)
    tifffile.imwrite(tmp_path / "other_labels.tif", labels.astype("uint16"), **kw)
    cfg = json.loads(json.dumps(TINY))
    ds = cfg["datasets"][0]
    ds["independent"] = [{"name": "other", "image": "other.tif", "labels": "other_labels.tif", "planes": [0, 2],
                          "description": "blobs, 16-bit", "source": "synthetic_blobs(seed=5)", "license": "CC0"}]
    ds["seeds"] = {"variants": ["batchnorm", "batchrenorm"], "seeds": {"cpu": [0, 1]},
                   "budgets": {"cpu": {"steps": 2}}}
    return cfg


def test_seed_repeats_report_mean_spread_orderings_and_independent_dice(tmp_path) -> None:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(_seeded(tmp_path)))
    result = runner.invoke(app, ["study", str(path), "--budget", "cpu", "--runs", "seeds"])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "runs" / "synth2d" / "batchnorm").exists() or not any(
        (tmp_path / "runs" / "synth2d" / "batchnorm").glob("*.pt"))  # --runs seeds: no main runs
    rows = {}
    for v in ("batchnorm", "batchrenorm"):
        for seed in (0, 1):
            run = tmp_path / "runs" / "synth2d" / "seeds" / "cpu" / v / f"seed{seed}"
            m = json.loads((run / "measure.json").read_text())
            assert m["seed"] == seed and m["steps"] == 2
            assert [s["name"] for s in m["independent"]] == ["other[0]", "other[2]"]
            assert m["independent"][0]["dtype"] == "uint16" and len(m["independent"][0]["dice"]) == 2
            rows[v, seed] = m
    # another seed: another network (initialization and tile order differ); the same seed: the same start
    from tilenorm_bmz.checkpoint import load_checkpoint

    def first_weight(variant: str, seed: int):
        model, _ = load_checkpoint(tmp_path / "runs" / "synth2d" / "seeds" / "cpu" / variant / f"seed{seed}" / "last.pt")
        return next(iter(model.parameters())).detach()

    assert not first_weight("batchnorm", 0).equal(first_weight("batchnorm", 1))
    report = (tmp_path / "STUDY.md").read_text()
    assert "## Repeats with other seeds" in report and "### synth2d: 2 seeds" in report
    assert "| batchnorm | global | 2 |" in report and " ± " in report
    assert "Dice independent (mean of 2 images)" in report and "Licence: CC0" in report
    assert "**tile mismatch max_dist**: batchnorm = batchrenorm (equal on every seed)" in report
    assert "**Dice eval, foreground**:" in report


def test_seed_config_sets_both_seeds_and_the_shorter_budget(tmp_path) -> None:
    cfg = StudyConfig.model_validate(_seeded(tmp_path))
    ds = cfg.datasets[0]
    main = variant_config(ds, cfg.variants[0], "cpu")
    rep = variant_config(ds, cfg.variants[0], "cpu", seed=7)
    assert (main.steps, rep.steps) == (3, 2)  # the seeds' budget on top of the dataset's cpu budget
    assert (rep.seed, rep.data.seed) == (7, 7) and (main.seed, main.data.seed) == (0, 0)
    bad = _seeded(tmp_path)
    bad["datasets"][0]["seeds"]["variants"] = ["nope"]
    with pytest.raises(ValidationError, match="not variants of the study"):
        StudyConfig.model_validate(bad)


def test_same_seed_same_tiles_across_variants_other_seed_other_tiles(tmp_path) -> None:
    """The pairing the orderings rely on: variants with one seed train on the same tiles in the same order."""
    from tilenorm_bmz.data import build_training_data

    cfg = StudyConfig.model_validate(_seeded(tmp_path))
    ds = cfg.datasets[0]

    def tiles(variant: int, seed: int) -> list:
        data = build_training_data(variant_config(ds, cfg.variants[variant], "cpu", seed=seed).data)
        return [(t.slices, t.flipped) for t in (data.train.sample_at(i) for i in range(4))]

    assert tiles(0, 1) == tiles(1, 1)  # batchnorm and batchrenorm, seed 1
    assert tiles(0, 1) != tiles(0, 2)


def test_paired_ordering_decides_from_the_spread() -> None:
    from tilenorm_bmz.study import holm, paired_ordering, paired_test

    def say(xa, xb, higher=True, atol=0.0):
        return paired_ordering(paired_test("a", "b", xa, xb, higher_is_better=higher, atol=atol))

    assert say({0: 0.9, 1: 0.91, 2: 0.92}, {0: 0.8, 1: 0.82, 2: 0.8}).startswith("a > b")
    noisy = say({0: 0.9, 1: 0.7, 2: 0.95}, {0: 0.8, 1: 0.85, 2: 0.8})
    assert noisy.startswith("a ≈ b") and "not resolved" in noisy and "a - b = +0.0333" in noisy
    # lower is better (disparity): a lower -> a better; the difference prints as a - b, negative
    lower = say({0: 0.0, 1: 0.0, 2: 0.01}, {0: 0.2, 1: 0.21, 2: 0.2}, higher=False)
    assert lower.startswith("a > b") and "a - b = -0.2" in lower
    lower_noisy = say({0: 0.0, 1: 0.3, 2: 0.0}, {0: 0.2, 1: 0.0, 2: 0.2}, higher=False)
    assert lower_noisy.startswith("a ≈ b") and "a - b = -0.0333" in lower_noisy
    # the same gap on every seed: resolved once there are 3 seeds, never with 2
    assert say({0: 1.0, 1: 1.0, 2: 1.0}, {0: 0.0, 1: 0.0, 2: 0.0}, higher=False).startswith("b > a")
    assert say({0: 1.0, 1: 1.0}, {0: 0.0, 1: 0.0}, higher=False).startswith("a ? b")
    # float noise within the tolerance is equality, not an ordering
    assert say({0: 1e-7, 1: 2e-7, 2: 1e-7}, {0: 0.0, 1: 0.0, 2: 0.0}, atol=1e-4).startswith("a = b")
    # only shared seeds are paired
    assert paired_test("a", "b", {0: 1.0, 1: 2.0, 5: 3.0}, {0: 0.0, 1: 0.0, 2: 0.0}, higher_is_better=True).n == 2
    assert holm([0.01, None, 0.04, 0.03]) == pytest.approx([0.03, None, 0.06, 0.06])


def test_independent_images_config_and_loading(tmp_path) -> None:
    from tilenorm_bmz.data import IndependentImages, load_independent

    meta = {"description": "d", "source": "s", "license": "l"}
    with pytest.raises(ValidationError, match="either sample or both"):
        IndependentImages.model_validate({"name": "x", "sample": "nuclei2d", "image": "a.tif", "labels": "b.tif",
                                          **meta})
    with pytest.raises(ValidationError, match="either sample or both"):
        IndependentImages.model_validate({"name": "x", "image": "a.tif", **meta})
    planes = IndependentImages.model_validate({"name": "c", "sample": "nuclei3d", "planes": [30, 40], **meta})
    ims = load_independent(planes, dims=2)
    assert [im.name for im in ims] == ["c[30]", "c[40]"] and ims[0].raw.shape == (1, 256, 256)
    assert ims[0].labels.shape == (256, 256) and ims[0].raw.dtype == "uint16"
    with pytest.raises(ValueError, match="are 3D but the model is 2D"):
        load_independent(IndependentImages.model_validate({"name": "v", "sample": "nuclei3d", **meta}), dims=2)
    with pytest.raises(ValueError, match="planes need a 3D image"):
        load_independent(IndependentImages.model_validate({"name": "p", "sample": "nuclei2d", "planes": [0], **meta}))


def test_independent_images_refuse_wrong_channels_and_empty_labels(tmp_path) -> None:
    from tilenorm_bmz.data import IndependentImages, load_independent

    meta = {"description": "d", "source": "s", "license": "l"}
    with pytest.raises(ValueError, match=r"1 channel.*model takes 2"):
        load_independent(IndependentImages.model_validate({"name": "c", "sample": "nuclei2d", **meta}), channels=2)
    empty = IndependentImages.model_validate({"name": "e", "sample": "nuclei3d", "planes": [0, 30], **meta})
    with pytest.raises(ValueError, match=r"e\[0\] have no labelled objects"):
        load_independent(empty, dims=2)
    rel = IndependentImages.model_validate({"name": "r", "image": "a.tif", "labels": "b.tif", **meta})
    assert rel.resolve_paths(tmp_path).image == tmp_path / "a.tif"
