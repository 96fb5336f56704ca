"""``model_zoo/``: published models, each rebuilt from its config (``tilenorm-bmz zoo build|list|check``).

A zoo entry is a folder with::

    zoo.yaml          ZooEntry: package name, the training and export configs, optionally a finished run
    train.yaml        TrainConfig that trains the network (on data embedded in tilenorm-bmz)
    export.yaml       ExportConfig: the package metadata
    NAME.bioimageio.zip   the package (built, bioimage.io-tested and gate-accepted)
    gate/report.json, gate/report.html    the gate's evidence
    README.md         generated: what it segments, data, training, measured figures, usage

The gate data of an entry is the held-out region of its training data (the validation split of
``train.yaml``), so ``zoo check`` re-validates every package on real data without the checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from ._version import __version__
from .config import ExportConfig, GateConfig, StrictModel, TrainConfig, atomic_write_text
from .data.independent import IndependentImages
from .metrics.independent import IndependentScore

__all__ = ["ZooEntry", "ZooBuild", "build_entry", "check_zoo", "find_entries", "gate_data", "list_zoo",
           "package_dice"]

logger = logging.getLogger(__name__)


class ZooEntry(StrictModel):
    """``zoo.yaml`` of a model_zoo folder (paths relative to the folder)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.+-]+$")
    """File stem of the package: NAME.bioimageio.zip."""
    summary: str
    """One sentence: what the model segments, in what data."""
    train: Path = Path("train.yaml")
    export: Path = Path("export.yaml")
    checkpoint: Path | None = None
    """A finished training run of exactly train.yaml to package instead of training again (e.g. the study's)."""
    run_dir: Path = Path("run")
    """Where ``zoo build`` trains when there is no checkpoint."""
    gate: GateConfig = Field(default_factory=GateConfig)
    independent: list[IndependentImages] = Field(default_factory=list)
    """Labelled images from other sources than the training data (another microscope, bit depth, annotator):
    ``zoo check`` scores the package on them as shipped and writes the figures into the README."""

    @model_validator(mode="after")
    def _unique_sets(self) -> ZooEntry:
        names = [i.name for i in self.independent]
        if len(set(names)) != len(names):
            raise ValueError(f"zoo entry {self.name}: independent image names must be unique, got {names}")
        return self

    @property
    def package_name(self) -> str:
        return f"{self.name}.bioimageio.zip"


@dataclass
class ZooBuild:
    """What ``zoo build`` produced."""

    folder: Path
    package: Path
    checkpoint: Path
    accepted: bool
    report_html: Path | None
    readme: Path


def load_entry(folder: str | os.PathLike[str]) -> tuple[Path, ZooEntry]:
    folder = Path(folder)
    path = folder / "zoo.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{folder} is not a zoo entry: it has no zoo.yaml")
    return folder, ZooEntry.from_yaml(path)


def find_entries(root: str | os.PathLike[str]) -> list[Path]:
    """Every folder below ``root`` (one level) with a zoo.yaml, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    return sorted(p.parent for p in root.glob("*/zoo.yaml"))


def gate_data(train_cfg: TrainConfig, base_dir: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """The held-out region of the training data: raw image ``(C, *s)``, instance labels ``(*s)``, a name."""
    from .data.dataset import open_pairs
    from .data.sampler import split_by_region

    data = train_cfg.data
    pairs = open_pairs(data, base_dir=base_dir)
    if data.split.by == "region":
        pair = pairs[0]
        _, region = split_by_region(pair.image.spatial_shape, data.split.fraction, data.split.axis)
    else:
        from .data.sampler import split_by_image

        _, val = split_by_image(pairs, data.split.fraction)
        pair = val[0]
        region = tuple(slice(0, s) for s in pair.image.spatial_shape)
    image = np.asarray(pair.image[(slice(None), *region)])
    labels = np.asarray(pair.labels[tuple(region)])
    where = ", ".join(f"{r.start}:{r.stop}" for r in region)
    return image, labels, f"{pair.name}[{where}] (held-out region)"


def _train(entry: ZooEntry, folder: Path, cfg: TrainConfig, progress: bool) -> Path:
    from .checkpoint import load_checkpoint
    from .train import Trainer

    run = folder / entry.run_dir
    last = run / "last.pt"
    if last.exists():
        _, info = load_checkpoint(last)
        if info.step >= cfg.steps:
            return last
        trainer = Trainer.resume(last, out_dir=run, config=cfg, progress=progress)
    else:
        trainer = Trainer(cfg, run, base_dir=folder, progress=progress)
    return trainer.fit().last


def build_entry(folder: str | os.PathLike[str], *, retrain: bool = False, progress: bool = False) -> ZooBuild:
    """Train (or reuse the named run), package with the gate, validate on the held-out data, write README."""
    from .bmz import export_package, validate_package
    from .checkpoint import load_checkpoint

    folder, entry = load_entry(folder)
    cfg = TrainConfig.from_yaml(folder / entry.train)
    export_cfg = ExportConfig.from_yaml(folder / entry.export)
    ckpt = (folder / entry.checkpoint) if entry.checkpoint is not None else None
    if ckpt is not None and ckpt.exists() and not retrain:
        _, info = load_checkpoint(ckpt)
        stored = TrainConfig.model_validate(info.extra.get("train_config") or {})
        if stored.model != cfg.model or stored.data != cfg.data or stored.steps != cfg.steps:
            raise ValueError(f"{ckpt} was not trained with {folder / entry.train}: rebuild with --retrain")
    else:
        ckpt = _train(entry, folder, cfg, progress)
    image, labels, name = gate_data(cfg, folder)
    package = folder / entry.package_name
    export_package(ckpt, package, export_config=export_cfg, sample=image, overwrite=True,
                   gate=_gate_hook(entry.gate, image, labels, name), progress=progress)
    report = validate_package(package, image, labels, config=entry.gate, out_dir=folder / "gate", name=name,
                              progress=progress)
    readme = write_readme(folder, entry, cfg, ckpt, report, export_cfg)
    write_independent(folder, entry, training_labels=labels)
    return ZooBuild(folder, package, ckpt, report.accepted, report.report_html, readme)


def _gate_hook(config: GateConfig, image: np.ndarray, labels: np.ndarray, name: str) -> Any:
    from .bmz import gate_hook

    return gate_hook(config, data=image, labels=labels, name=name)


def package_dice(package: str | os.PathLike[str], specs: list[IndependentImages], *,
                 base_dir: str | os.PathLike[str] | None = None, device: str = "auto",
                 config: GateConfig | None = None) -> list[IndependentScore]:
    """Dice of a package as shipped on labelled images: each image preprocessed by the package's own pipeline
    (bioimage.io's, on the whole image), predicted tile by tile with the package's halo (tiles as the trainer
    validates: 128 per axis enlarged for the halo, at most the image), scored against the training targets of
    its labels (the gate's rule for instance labels) at the gate config's threshold."""
    from .bmz.gate import _targets
    from .bmz.subject import load_subject
    from .data import load_independent
    from .metrics import independent_dice
    from .tiling import TiledPredictor
    from .train.trainer import _val_tile

    config = config or GateConfig()
    subject = load_subject(package, config)
    halo = tuple(subject.declared_halo or (0,) * subject.dims)
    predictors: dict[tuple[int, ...], Any] = {}  # one per tile shape: the network is prepared once per predictor

    def predict(x: np.ndarray) -> np.ndarray:
        tile = _val_tile((128,) * subject.dims, halo, subject.divisor, tuple(x.shape[1:]))
        if tile not in predictors:
            predictors[tile] = TiledPredictor(subject.network, tile, halo, device=device, divisor=subject.divisor)
        return predictors[tile].predict(x)

    def targets(labels: np.ndarray, channels: int) -> np.ndarray:
        return _targets(labels, tuple(labels.shape), channels, subject.dims)[1]

    scores: list[IndependentScore] = []
    for spec in specs:
        images = load_independent(spec, base_dir, dims=subject.dims, channels=subject.in_channels)
        scores += independent_dice(predict, images, preprocess=subject.preprocess, targets=targets,
                                   threshold=config.threshold)
    return scores


def check_zoo(root: str | os.PathLike[str], *, progress: bool = False) -> list[tuple[str, Any]]:
    """Re-validate every package of the zoo on its held-out data, score it as shipped on its independent images
    (``gate/independent.json`` and the README's section); returns ``(name, GateReport)`` pairs."""
    from .bmz import validate_package

    out = []
    for folder in find_entries(root):
        _, entry = load_entry(folder)
        package = folder / entry.package_name
        if not package.exists():
            raise FileNotFoundError(f"{package} is missing: build it with `tilenorm-bmz zoo build {folder}`")
        cfg = TrainConfig.from_yaml(folder / entry.train)
        image, labels, name = gate_data(cfg, folder)
        report = validate_package(package, image, labels, config=entry.gate, out_dir=folder / "gate",
                                  name=name, progress=progress)
        write_independent(folder, entry, training_labels=labels)
        out.append((entry.name, report))
    return out


INDEPENDENT_START = "<!-- zoo check: independent images -->"
INDEPENDENT_END = "<!-- /zoo check -->"


def write_independent(folder: Path, entry: ZooEntry, *, training_labels: np.ndarray | None = None,
                      device: str = "auto") -> list[IndependentScore]:
    """Score the package on the entry's independent images; write ``gate/independent.json`` and the README's
    section (between its markers, else before *Use it*). An entry without independent images loses both."""
    from datetime import date

    from .introspect import resolve_device
    from .metrics.independent import object_diameter

    record_path = folder / "gate" / "independent.json"
    readme = folder / "README.md"
    if not entry.independent:
        record_path.unlink(missing_ok=True)
        if readme.exists():
            atomic_write_text(readme, _replace_section(readme.read_text(), ""))
        return []
    dev = str(resolve_device(device))
    scores = package_dice(folder / entry.package_name, entry.independent, base_dir=folder, device=dev,
                          config=entry.gate)
    if training_labels is None:
        _, training_labels, _ = gate_data(TrainConfig.from_yaml(folder / entry.train), folder)
    n, diameter = object_diameter(training_labels)
    record = {"package": entry.package_name, "measured": date.today().isoformat(), "device": dev,
              "training_objects": {"held_out_region": n, "median_diameter": diameter},
              "sets": [s.model_dump(mode="json") for s in entry.independent],
              "scores": [s.model_dump(mode="json") for s in scores]}
    record_path.parent.mkdir(exist_ok=True)
    atomic_write_text(record_path, json.dumps(record, indent=2) + "\n")
    if readme.exists():
        section = "\n".join(independent_section(entry, scores, f"{record['measured']} ({dev})", diameter))
        atomic_write_text(readme, _replace_section(readme.read_text(), section))
    return scores


def _replace_section(text: str, section: str) -> str:
    """``text`` with the section between the markers replaced (or inserted before *Use it*, or appended)."""
    if INDEPENDENT_START in text:
        head, rest = text.split(INDEPENDENT_START, 1)
        if INDEPENDENT_END not in rest:
            raise ValueError(f"README.md has {INDEPENDENT_START!r} but not {INDEPENDENT_END!r}: restore the end "
                             "marker (or delete the section) and run zoo check again")
        tail = rest.split(INDEPENDENT_END, 1)[1]
        return head + section + (tail if section else tail.lstrip("\n"))
    if not section:
        return text
    if "\n## Use it" in text:
        head, rest = text.split("\n## Use it", 1)
        return head.rstrip("\n") + "\n\n" + section + "\n\n## Use it" + rest
    return text.rstrip("\n") + "\n\n" + section + "\n"


def independent_section(entry: ZooEntry, scores: list[IndependentScore], measured: str,
                        training_diameter: float | None = None) -> list[str]:
    """The README's section of the Dice on independent images (between markers ``zoo check`` rewrites)."""
    from .metrics import mean_dice

    unit = "px" if scores and len(scores[0].shape) == 2 else "voxels"
    size = (f" The training image's nuclei are {training_diameter:.0f} {unit} across (median equivalent diameter, "
            "held-out region); on images whose nuclei are much larger or smaller, rescale first."
            if training_diameter else "")
    lines = [INDEPENDENT_START, "## On images from other sources", "",
             f"Dice of the package as shipped (its own preprocessing on each whole image, tiled with its halo) "
             f"against the labels, measured by `tilenorm-bmz zoo check` on {measured}. These images come from "
             "other sources than the training image (microscope, cell line, bit depth, annotator): they indicate "
             f"what to expect on your own data.{size}", "",
             "| set | image | dtype, values | nuclei, diameter | Dice (foreground / boundary) |",
             "|---|---|---|---|---|"]
    for spec in entry.independent:
        mine = [s for s in scores if s.name == spec.name or s.name.startswith(f"{spec.name}[")]
        for s in mine:
            lo, hi = s.value_range
            d = f"{s.objects}, {s.object_diameter:.0f} {unit}" if s.object_diameter else f"{s.objects}"
            lines.append(f"| {spec.name} | {s.name} {tuple(s.shape)} | {s.dtype}, {lo:g}..{hi:g} | {d} | "
                         f"{_fmt(s.dice)} |")
        if len(mine) > 1:
            lines.append(f"| {spec.name} | **mean of {len(mine)}** | | | **{_fmt(mean_dice(mine))}** |")
    if len(scores) > 1:
        lines.append(f"| **all** | **mean of {len(scores)}** | | | **{_fmt(mean_dice(scores))}** |")
    lines.append("")
    for spec in entry.independent:
        planes = f" Planes {spec.planes} along the first axis, each a 2D image." if spec.planes else ""
        lines.append(f"- `{spec.name}`: {spec.description}.{planes} Source: {spec.source}. Licence: {spec.license}.")
    return [*lines, INDEPENDENT_END]


def list_zoo(root: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """One row per entry with the figures of its last gate report (``gate/report.json``)."""
    rows = []
    for folder in find_entries(root):
        _, entry = load_entry(folder)
        cfg = TrainConfig.from_yaml(folder / entry.train)
        row: dict[str, Any] = {
            "name": entry.name,
            "folder": str(folder),
            "dims": cfg.model.dims if cfg.model else None,
            "norm": cfg.model.norm.kind if cfg.model else None,
            "package": (folder / entry.package_name).exists(),
        }
        report_path = folder / "gate" / "report.json"
        if report_path.exists():
            row.update(_figures(json.loads(report_path.read_text())))
        rows.append(row)
    return rows


def _figures(report: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of a gate report.json."""
    results = report.get("results") or {}
    tm = results.get("tile_mismatch") or {}
    disp = results.get("train_eval_disparity") or {}
    halo = results.get("halo_sufficiency") or {}
    images = ((report.get("extra") or {}).get("gate") or {}).get("images") or [{}]
    return {
        "accepted": report.get("accepted"),
        "max_dist": tm.get("max_dist"),
        "tile_mismatch": tm.get("mismatch"),
        "disparity": disp.get("disparity") if disp.get("applicable", True) else None,
        "halo": halo.get("declared_halo"),
        "receptive_field": halo.get("measured_trf") or halo.get("measured"),
        "dice": images[0].get("dice"),
        "seams": images[0].get("seams"),
        "validated": (report.get("environment") or {}).get("created"),
    }


def _fmt(values: Any, fmt: str = "{:.3f}") -> str:
    if values is None:
        return "n/a"
    if isinstance(values, list | tuple):
        return " / ".join(fmt.format(v) if isinstance(v, int | float) else str(v) for v in values)
    return fmt.format(values) if isinstance(values, int | float) else str(values)


def write_readme(folder: Path, entry: ZooEntry, cfg: TrainConfig, checkpoint: Path, report: Any,
                 export_cfg: ExportConfig) -> Path:
    """The entry's README.md from its configs and the gate's measurements."""
    from .checkpoint import load_checkpoint

    _, info = load_checkpoint(checkpoint)
    fig = _figures(json.loads(Path(report.report_json).read_text())) if report.report_json else {}
    val = info.extra.get("validation") or {}
    m = cfg.model
    assert m is not None
    dims = f"{m.dims}D"
    axes = "z, y, x" if m.dims == 3 else "y, x"
    seams = fig.get("seams") or {}
    norm_settings = cfg.data.input_normalization
    lines = [
        f"# {entry.name}",
        "",
        entry.summary,
        "",
        f"Package: [`{entry.package_name}`]({entry.package_name}) (bioimage.io model format 0.5, weights: "
        "PyTorch state dict + TorchScript). Gate evidence: [gate/report.html](gate/report.html).",
        "",
        "## Data",
        "",
        f"Trained on the embedded `{cfg.data.sample}` sample of tilenorm-bmz (provenance and licence: "
        "`tilenorm_bmz/data/sample/README.md`), split by region "
        f"({cfg.data.split.fraction:.0%} train / {1 - cfg.data.split.fraction:.0%} held out along axis "
        f"{cfg.data.split.axis}). Targets: foreground (object minus its boundary) and the inner boundary of every "
        "nucleus, from instance labels.",
        "",
        "## Training",
        "",
        f"U-Net ({dims}, depth {m.depth}, features {m.level_features}, {m.norm.kind}, momentum {m.norm.momentum}), "
        f"Dice loss, Adam lr {cfg.lr}, {info.step} steps of batch {cfg.batch_size} x {cfg.grad_accumulation} "
        f"accumulated passes on {list(cfg.data.tile_shape)} tiles with random flips. BatchRenorm schedule: "
        f"r_max 1, d_max 0 for {cfg.schedule.warmup_steps} steps, then linear to r_max {cfg.schedule.r_max}, "
        f"d_max {cfg.schedule.d_max} over {cfg.schedule.ramp_steps} steps. Input: {norm_settings.mode} quantile "
        f"normalization ({norm_settings.lower} / {norm_settings.upper}, clipped). Config: [train.yaml](train.yaml); "
        f"rebuild with `tilenorm-bmz zoo build {folder.as_posix()}`.",
        "",
        f"Validation during training (step {val.get('step', 'n/a')}): Dice "
        f"{_fmt(list((val.get('dice') or {}).values()) or None)}, train/eval disparity "
        f"{_fmt(list((val.get('disparity') or {}).values()) or None)} (foreground / boundary).",
        "",
        "# Validation",
        "",
        f"`tilenorm-bmz validate` on the held-out region ({report.data[0].name if report.data else ''}), "
        f"{report.created}: **{'accepted' if report.accepted else 'rejected'}**.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| Dice vs labels (foreground / boundary) | {_fmt(fig.get('dice'))} |",
        f"| tile mismatch max_dist (paper Fig. 3) | {_fmt(fig.get('max_dist'), '{:.2g}')} |",
        f"| tile mismatch per class | {_fmt(fig.get('tile_mismatch'))} |",
        f"| train/eval disparity | {_fmt(fig.get('disparity'))} |",
        f"| halo in the package ({axes}) | {_fmt(fig.get('halo'), '{}')} |",
        f"| one-sided receptive field | {_fmt(fig.get('receptive_field'), '{}')} |",
    ]
    for consumer, value in seams.items():
        lines.append(f"| max abs(tiled - whole), {consumer} | {_fmt(value, '{:.2g}')} |")
    lines += [
        "",
        "## Use it",
        "",
        f"- **ilastik** (Neural Network Classification workflow): load `{entry.package_name}`; ilastik tiles the "
        "image with the halo written in the package. " + (
            "The package normalizes with fixed values from the training data (`scale_linear` + clip), identical "
            "for every tile, so ilastik's tiles agree too (gate row above). Images should come in the intensity "
            "range of the training data; rescale others to it first."
            if export_cfg.input_norm == "fixed" else
            "ilastik computes the package's percentile normalization on every tile on its own, so tiles can "
            "differ (gate row above): for ilastik, write the variant for your dataset, whose preprocessing is fixed "
            f"values fitted on it (`tilenorm-bmz refit {entry.package_name} --data IMG ... -o mine.zip`). The "
            "percentile normalization itself adapts to any bit depth and intensity range (8/16-bit, float)."),
        f"- **deepImageJ** (Fiji): install the zip with *DeepImageJ Install Model*, then *DeepImageJ Run* on a "
        f"{dims} image with axes {axes}; TorchScript weights, tiling allowed, halo from the package.",
        "- **Python**:",
        "",
        "```python",
        "import tifffile",
        "from tilenorm_bmz.bmz import read_package_model",
        "from tilenorm_bmz.data import InputNormalization, fit_normalization",
        "from tilenorm_bmz.tiling import TiledPredictor",
        "",
        f'model, _, extra = read_package_model("{entry.package_name}")',
        'image = tifffile.imread("image.tif")[None].astype("float32")        # (1, ' + axes.upper() + ")",
        'norm = fit_normalization(InputNormalization.model_validate(extra["input_normalization"]), image)',
        f"pred = TiledPredictor(model, tile_shape={list((128,) * m.dims)}, halo={list(fig.get('halo') or [])})"
        ".predict(norm.apply(image))",
        "```",
        "",
        f"or `tilenorm-bmz predict {entry.package_name} image.tif -o prediction.zarr`.",
        "",
        f"Built by tilenorm-bmz {__version__}.",
    ]
    path = folder / "README.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
