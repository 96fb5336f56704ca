"""model_zoo: the published packages pass the gate and bioimage.io tests; zoo build/list/check on a tiny entry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tilenorm_bmz.cli import app
from tilenorm_bmz.config import TrainConfig
from tilenorm_bmz.zoo import ZooEntry, find_entries, gate_data, list_zoo

runner = CliRunner()
ZOO = Path(__file__).resolve().parents[1] / "model_zoo"


def _tiny_entry(folder: Path) -> None:
    folder.mkdir(parents=True)
    train = {
        "model": {"dims": 2, "features": 4, "depth": 2},
        "data": {"sample": "synthetic", "tile_shape": [64, 64], "synthetic": {"shape": [160, 224], "seed": 2}},
        "schedule": {"warmup_steps": 3, "ramp_steps": 3},
        "steps": 8, "batch_size": 2, "grad_accumulation": 1, "validate_every": 8, "checkpoint_every": 8,
        "device": "cpu", "disparity_tiles": 2,
    }
    (folder / "train.yaml").write_text(yaml.safe_dump(train))
    export = {"name": "tiny zoo test model", "description": "A tiny test network.",
              "authors": [{"name": "Test Author"}]}
    (folder / "export.yaml").write_text(yaml.safe_dump(export))
    import tifffile

    from tilenorm_bmz.data import synthetic_blobs

    image, labels = synthetic_blobs((96, 80), seed=9, dtype="uint16")
    tifffile.imwrite(folder / "other.tif", image[0].astype("float32") * 40)  # float, another intensity range
    tifffile.imwrite(folder / "other_labels.tif", labels)
    other = {"name": "other", "image": "other.tif", "labels": "other_labels.tif", "description": "blobs x 40",
             "source": "synthetic_blobs(seed=9)", "license": "CC0"}
    # an 8-step network is far from converged: the test is about the machinery, so disparity does not gate
    entry = {"name": "tiny", "summary": "A tiny test entry.", "gate": {"max_disparity": 1.0, "max_crops": 1},
             "independent": [other]}
    (folder / "zoo.yaml").write_text(yaml.safe_dump(entry))


@pytest.mark.bmz
def test_zoo_build_list_check_on_a_tiny_entry(tmp_path) -> None:
    _tiny_entry(tmp_path / "zoo" / "tiny")
    result = runner.invoke(app, ["zoo", "build", str(tmp_path / "zoo" / "tiny")])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "zoo" / "tiny"
    assert (folder / "tiny.bioimageio.zip").exists()
    report = json.loads((folder / "gate" / "report.json").read_text())
    assert report["accepted"] is True and report["results"]["tile_mismatch"]["max_dist"] == 0.0
    readme = (folder / "README.md").read_text()
    assert "# Validation" in readme and "ilastik" in readme and "deepImageJ" in readme
    rows = list_zoo(tmp_path / "zoo")
    assert rows[0]["name"] == "tiny" and rows[0]["accepted"] is True and rows[0]["max_dist"] == 0.0
    result = runner.invoke(app, ["zoo", "list", str(tmp_path / "zoo")])
    assert result.exit_code == 0 and "accepted" in result.output
    record = json.loads((folder / "gate" / "independent.json").read_text())
    assert [s["name"] for s in record["scores"]] == ["other"] and len(record["scores"][0]["dice"]) == 2
    readme = (folder / "README.md").read_text()
    assert readme.count("## On images from other sources") == 1 and "Licence: CC0" in readme
    assert readme.index("## On images from other sources") < readme.index("## Use it")
    result = runner.invoke(app, ["zoo", "check", str(tmp_path / "zoo")])
    assert result.exit_code == 0, result.output
    again = (folder / "README.md").read_text()
    assert again.count("## On images from other sources") == 1  # the section is replaced, not appended


def test_zoo_entry_errors(tmp_path) -> None:
    result = runner.invoke(app, ["zoo", "build", str(tmp_path)])
    assert result.exit_code == 2 and "zoo.yaml" in result.output
    result = runner.invoke(app, ["zoo", "list", str(tmp_path / "missing")])
    assert result.exit_code == 2


def test_gate_data_is_the_held_out_region() -> None:
    cfg = TrainConfig.model_validate({
        "model": {"dims": 2, "features": 4},
        "data": {"sample": "nuclei2d", "tile_shape": [64, 64], "split": {"by": "region", "fraction": 0.7}},
    })
    image, labels, name = gate_data(cfg, Path("."))
    assert image.shape == (1, 512, 154) and labels.shape == (512, 154)
    assert "358:512" in name and labels.max() > 0


PUBLISHED = ("nuclei2d-batchrenorm", "nuclei3d-batchrenorm")


def test_the_published_entries_are_the_ones_gated() -> None:
    assert {e.name for e in find_entries(ZOO)} == set(PUBLISHED)


@pytest.mark.slow
@pytest.mark.bmz
# one test per entry, the 3D one (minutes) first: the slow suite runs them in parallel
@pytest.mark.parametrize("entry_name", [pytest.param(n, marks=[pytest.mark.heavy] if "3d" in n else []) for n in PUBLISHED])
def test_published_zoo_packages_pass_the_gate_and_bioimageio_tests(tmp_path, entry_name: str) -> None:
    """Every package in model_zoo/ is accepted by the gate (bioimage.io test included) on its held-out data."""
    from tilenorm_bmz.bmz import validate_package

    folder = ZOO / entry_name
    entry = ZooEntry.from_yaml(folder / "zoo.yaml")
    package = folder / entry.package_name
    assert package.exists(), f"{package} is not built"
    cfg = TrainConfig.from_yaml(folder / entry.train)
    image, labels, name = gate_data(cfg, folder)
    report = validate_package(package, image, labels, config=entry.gate, out_dir=tmp_path / entry.name, name=name)
    failed = {c.name: c.details for c in report.checks if c.status == "failed"}
    assert report.accepted, f"{entry.name} rejected: {failed}"
    assert report.bioimageio_test is not None and report.bioimageio_test.passed
    assert report.tile_mismatch is not None and report.tile_mismatch.max_dist == 0.0


@pytest.mark.bmz
def test_published_readmes_report_dice_on_independent_images_as_measured() -> None:
    """Every entry names labelled images from other sources; its README reports the Dice `zoo check` measured,
    and measuring again gives the recorded figures (here the first two images of the 2D entry)."""
    from tilenorm_bmz.zoo import package_dice

    for name in PUBLISHED:
        folder = ZOO / name
        entry = ZooEntry.from_yaml(folder / "zoo.yaml")
        assert entry.independent, f"{name} names no independent images"
        readme = (folder / "README.md").read_text()
        record = json.loads((folder / "gate" / "independent.json").read_text())
        assert [s["name"] for s in record["sets"]] == [s.name for s in entry.independent]
        assert "## On images from other sources" in readme and all(s.license in readme for s in entry.independent)
        for score in record["scores"]:
            assert f"| {' / '.join(f'{v:.3f}' for v in score['dice'])} |" in readme
    folder = ZOO / "nuclei2d-batchrenorm"
    entry = ZooEntry.from_yaml(folder / "zoo.yaml")
    record = json.loads((folder / "gate" / "independent.json").read_text())
    again = package_dice(folder / entry.package_name, entry.independent[:2], base_dir=folder, device="cpu")
    assert record["device"] == "cpu" and len(again) == 2
    for new, old in zip(again, record["scores"][:2], strict=True):
        assert new.name == old["name"] and new.objects == old["objects"] > 0
        assert new.dice == pytest.approx(old["dice"], abs=1e-6)


def test_readme_section_is_replaced_inserted_or_removed() -> None:
    from tilenorm_bmz.zoo import INDEPENDENT_END, INDEPENDENT_START, _replace_section

    base = "# m\n\nintro\n\n## Use it\n\nuse\n"
    section = f"{INDEPENDENT_START}\n## On images from other sources\nA\n{INDEPENDENT_END}"
    once = _replace_section(base, section)
    assert once.index("## On images") < once.index("## Use it")
    twice = _replace_section(once, section.replace("\nA\n", "\nB\n"))
    assert twice.count(INDEPENDENT_START) == 1 and "\nB\n" in twice and "\nA\n" not in twice
    assert _replace_section(twice, "").count("On images") == 0 and "## Use it" in _replace_section(twice, "")
    with pytest.raises(ValueError, match="restore the end marker"):
        _replace_section(base + INDEPENDENT_START + "\nhalf", section)
