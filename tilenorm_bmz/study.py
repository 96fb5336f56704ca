"""The normalization study (``tilenorm-bmz study``): the paper's Table 1 on real data.

The same U-Net is trained with each normalization variant (BatchNorm, InstanceNorm, BatchRenorm, none with
global input normalization; BatchNorm and InstanceNorm with tile-wise input normalization) on each dataset
and measured on the held-out region: Dice per class in eval mode and in train mode, train/eval disparity,
tile mismatch ("no" when max_dist is 0) and Dice against tile size. The results go to a Markdown report
with figures (``model_zoo/STUDY.md``).

One config runs on any machine: each dataset has a ``cpu`` and a ``gpu`` budget (steps, schedule, tile,
batch); ``--budget auto`` picks ``gpu`` when CUDA is present. Finished runs are reused, interrupted ones
resumed, so the study can be run in pieces (``--dataset``, ``--variant``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ._version import __version__
from .config import NormKind, StrictModel, StudyRunSet, TrainConfig, atomic_write_text
from .data.independent import IndependentImages
from .metrics.independent import IndependentScore, mean_dice

__all__ = [
    "PAPER_VARIANTS",
    "StudyBudget",
    "StudyConfig",
    "StudyDataset",
    "StudyMeasure",
    "StudySeeds",
    "StudyVariant",
    "VariantResult",
    "run_study",
    "write_study_report",
]

logger = logging.getLogger(__name__)

Budget = Literal["cpu", "gpu"]


class StudyVariant(StrictModel):
    """One row of the table: a norm kind and the input normalization it is trained and run with."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.+-]+$")
    norm: NormKind
    input_normalization: Literal["global", "tilewise"] = "global"


PAPER_VARIANTS: list[StudyVariant] = [
    StudyVariant(name="batchnorm", norm="batchnorm"),
    StudyVariant(name="instancenorm", norm="instancenorm"),
    StudyVariant(name="batchrenorm", norm="batchrenorm"),
    StudyVariant(name="none", norm="none"),
    StudyVariant(name="batchnorm-tilewise", norm="batchnorm", input_normalization="tilewise"),
    StudyVariant(name="instancenorm-tilewise", norm="instancenorm", input_normalization="tilewise"),
]


class StudyBudget(StrictModel):
    """Training budget overrides for one machine class (unset fields keep the dataset's train config)."""

    steps: int | None = Field(None, ge=1)
    warmup_steps: int | None = Field(None, ge=0)
    ramp_steps: int | None = Field(None, ge=0)
    tile_shape: tuple[int, ...] | None = None
    batch_size: int | None = Field(None, ge=1)
    grad_accumulation: int | None = Field(None, ge=1)
    validate_every: int | None = Field(None, ge=1)
    amp: Literal["none", "bf16", "fp16"] | None = None


class StudyMeasure(StrictModel):
    """How every trained variant is measured on the held-out region."""

    predict_tile: tuple[int, ...] | None = None
    """Tile of the Dice predictions (eval and train mode); default: the training tile."""
    mismatch_crop: tuple[int, ...] | None = None
    """Tile-mismatch crop; default: the paper's (192x192x288 / 192x288), scaled down to the image."""
    mismatch_tile: int | None = None
    mismatch_offset: int | None = None
    mismatch_stride: int = Field(64, ge=1)
    max_crops: int | None = Field(16, ge=1)
    """Evaluate at most this many crops of the grid (evenly spread)."""
    disparity_tiles: int = Field(8, ge=1)
    sweep_sizes: list[int] | None = None
    """Tile sizes of the Dice-vs-tile-size sweep (cubes/squares, clipped to the image)."""
    threshold: float = Field(0.5, gt=0.0, lt=1.0)


class StudySeeds(StrictModel):
    """Repeated runs of some variants with other seeds, for the mean and spread of every figure.

    A seed sets the network's initialization and the training tiles' order (``seed`` and ``data.seed`` of the
    training config); runs of different variants with the same seed see the same tiles in the same order, so
    variants are compared seed by seed (paired)."""

    variants: list[str] = Field(default_factory=lambda: ["batchnorm", "instancenorm", "batchrenorm"])
    seeds: dict[Budget, list[int]]
    """Seeds per machine class (a class without an entry runs no repeats: the main table is its one seed)."""
    budgets: dict[Budget, StudyBudget] = Field(default_factory=dict)
    """Overrides on top of the dataset's budget for these runs (e.g. a shorter CPU run for many seeds)."""

    @model_validator(mode="after")
    def _check(self) -> StudySeeds:
        for b, seeds in self.seeds.items():
            if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
                raise ValueError(f"seeds.{b}: seeds must be distinct and >= 0, got {seeds}")
        if not self.variants or len(set(self.variants)) != len(self.variants):
            raise ValueError(f"seeds.variants must name distinct variants to repeat, got {self.variants}")
        unused = set(self.budgets) - set(self.seeds)
        if unused:
            raise ValueError(f"seeds.budgets has {sorted(unused)} but seeds.seeds runs none there: add seeds for it "
                             "or remove the budget")
        return self


class StudyDataset(StrictModel):
    """A dataset of the study: the base training config (its norm and input normalization are replaced
    per variant), the budgets, and the measurement settings."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.+-]+$")
    train: TrainConfig
    budgets: dict[Budget, StudyBudget] = Field(default_factory=dict)
    measure: StudyMeasure = Field(default_factory=StudyMeasure)
    independent: list[IndependentImages] = Field(default_factory=list)
    """Labelled images from other sources (another microscope, bit depth, annotator): every run is also scored
    on them, each image normalized on its own as the variant's input normalization says."""
    seeds: StudySeeds | None = None

    @model_validator(mode="after")
    def _check(self) -> StudyDataset:
        if self.train.model is None:
            raise ValueError(f"dataset {self.name}: train.model is required")
        names = [i.name for i in self.independent]
        if len(set(names)) != len(names):
            raise ValueError(f"dataset {self.name}: independent image names must be unique, got {names}")
        return self


class StudyConfig(StrictModel):
    """The whole study (``tilenorm-bmz study CONFIG.yaml``)."""

    datasets: list[StudyDataset]
    variants: list[StudyVariant] = Field(default_factory=lambda: [v.model_copy() for v in PAPER_VARIANTS])
    out_dir: Path = Path("study")
    """Run folders: OUT_DIR/DATASET/VARIANT/ (checkpoints, metrics, measure.json)."""
    report: Path = Path("STUDY.md")
    """The Markdown report; its figures go to a folder next to it (REPORT_STEM_figures/)."""

    @model_validator(mode="after")
    def _unique(self) -> StudyConfig:
        for what, names in (("dataset", [d.name for d in self.datasets]), ("variant", [v.name for v in self.variants])):
            dup = {n for n in names if names.count(n) > 1}
            if dup:
                raise ValueError(f"{what} names must be unique; repeated: {sorted(dup)}")
        if not self.datasets or not self.variants:
            raise ValueError("the study needs at least one dataset and one variant")
        known = {v.name for v in self.variants}
        for ds in self.datasets:
            unknown = set(ds.seeds.variants) - known if ds.seeds is not None else set()
            if unknown:
                raise ValueError(f"dataset {ds.name}: seeds.variants {sorted(unknown)} are not variants of the study "
                                 f"({sorted(known)})")
        return self

    def resolve_paths(self, base_dir: str | os.PathLike[str]) -> StudyConfig:
        base = Path(base_dir)
        datasets = [ds.model_copy(update={"independent": [i.resolve_paths(base) for i in ds.independent]})
                    for ds in self.datasets]
        return self.model_copy(update={
            "out_dir": self.out_dir if self.out_dir.is_absolute() else base / self.out_dir,
            "report": self.report if self.report.is_absolute() else base / self.report,
            "datasets": datasets,
        })


class VariantResult(BaseModel):
    """The measured row of one dataset x variant (``measure.json`` in the run folder)."""

    model_config = ConfigDict(extra="forbid")

    dataset: str
    variant: str
    norm: str
    input_normalization: str
    channels: list[str]
    steps: int
    train_seconds: float | None
    budget: str
    dice_eval: list[float]
    dice_train: list[float] | None
    disparity: list[float] | None
    disparity_batch: str | None
    mismatch: list[float]
    max_dist: float
    mismatch_geometry: dict[str, Any]
    sweep: list[dict[str, Any]]
    halo: list[int]
    predict_tile: list[int]
    validation_shape: list[int]
    device: str
    seed: int | None = None
    """The repeat's seed (None: a row of the main table, trained with the config's own seeds)."""
    independent: list[IndependentScore] | None = None
    """Dice on every image of the dataset's independent sets."""

    @property
    def dice_independent(self) -> list[float] | None:
        return mean_dice(self.independent) if self.independent else None

    @property
    def seamless(self) -> bool:
        return self.max_dist == 0.0


# -- configuration per run ----------------------------------------------------------------------------
def pick_budget(budget: str) -> Budget:
    if budget == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if budget not in ("cpu", "gpu"):
        raise ValueError(f"budget must be auto, cpu or gpu, got {budget!r}")
    return budget  # type: ignore[return-value]


def variant_config(dataset: StudyDataset, variant: StudyVariant, budget: Budget, *,
                   seed: int | None = None) -> TrainConfig:
    """The training config of one run: the dataset's base config, the variant's norm and input
    normalization, the budget's overrides (validated again as a whole); with ``seed``, a repeat: the seeds'
    budget overrides on top, and ``seed`` as the network's and the tiles' seed."""
    cfg = dataset.train.model_dump(mode="json")
    cfg["model"]["norm"]["kind"] = variant.norm
    cfg["data"]["input_normalization"]["mode"] = variant.input_normalization
    budgets = [dataset.budgets.get(budget)]
    if seed is not None:
        if dataset.seeds is None:
            raise ValueError(f"dataset {dataset.name} has no seeds block")
        budgets.append(dataset.seeds.budgets.get(budget))
        cfg["seed"] = seed
        cfg["data"]["seed"] = seed
    for b in budgets:
        if b is None:
            continue
        for key in ("steps", "batch_size", "grad_accumulation", "validate_every", "amp"):
            v = getattr(b, key)
            if v is not None:
                cfg[key] = v
        for key in ("warmup_steps", "ramp_steps"):
            v = getattr(b, key)
            if v is not None:
                cfg["schedule"][key] = v
        if b.tile_shape is not None:
            cfg["data"]["tile_shape"] = list(b.tile_shape)
    cfg["checkpoint_every"] = min(cfg["checkpoint_every"], cfg["steps"])
    return TrainConfig.model_validate(cfg)


# -- measuring ----------------------------------------------------------------------------------------
def measure_variant(
    checkpoint: str | os.PathLike[str],
    dataset: StudyDataset,
    variant: StudyVariant,
    *,
    base_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
    figures_dir: Path | None = None,
    progress: bool = False,
    seed: int | None = None,
    sweep: bool = True,
) -> VariantResult:
    """Measure a trained run like the paper's Table 1 on its held-out region (and draw its figures), and on
    the dataset's independent images."""
    from .checkpoint import load_checkpoint
    from .data import build_training_data
    from .introspect import resolve_device
    from .metrics import (
        NormTrainMode,
        RunContext,
        TilewiseNormalized,
        dice,
        tile_mismatch,
        tile_size_sweep,
        train_eval_disparity,
    )
    from .tiling import TiledPredictor
    from .train.trainer import _val_tile, _validation_halo

    dev = resolve_device(device)
    model, info = load_checkpoint(checkpoint, map_location=dev)
    cfg = TrainConfig.model_validate(info.extra["train_config"])
    data = build_training_data(cfg.data, base_dir=base_dir)
    item = data.validation[0]
    channels = list(data.channel_names)
    dims = data.dims
    divisor = tuple(getattr(model, "divisor", (1,) * dims))
    halo = _validation_halo(model, dims)
    ms = dataset.measure
    tilewise = item.normalization.per_tile
    settings = cfg.data.input_normalization
    if tilewise:
        image = item.raw().astype(np.float32)
        net: torch.nn.Module = TilewiseNormalized.from_settings(model, settings)
        net_train: torch.nn.Module = TilewiseNormalized.from_settings(NormTrainMode(model), settings)
    else:
        image = item.normalized()
        net, net_train = model, NormTrainMode(model)
    targets = item.targets
    if ms.predict_tile is not None:
        tile = tuple(ms.predict_tile)
    else:  # the training tile, enlarged where the halo needs it, at most the (padded) image
        tile = _val_tile(tuple(cfg.data.tile_shape), halo, divisor, tuple(image.shape[1:]))

    pred_eval = TiledPredictor(net, tile, halo, batch_size=1, device=dev, progress=progress).predict(image)
    dice_eval = [float(v) for v in dice(pred_eval, targets, ms.threshold, channel_axis=0)]
    dice_train = None
    if norm_has_running_stats(model):
        pred_train = TiledPredictor(net_train, tile, halo, batch_size=1, device=dev).predict(image)
        dice_train = [float(v) for v in dice(pred_train, targets, ms.threshold, channel_axis=0)]
    else:
        dice_train = list(dice_eval)  # no running statistics: train mode computes the same
    run = RunContext(device=dev, divisor=divisor, threshold=ms.threshold)
    disp = train_eval_disparity(net, image, batch_size=cfg.batch_size, n_tiles=ms.disparity_tiles,
                                tile_shape=cfg.data.tile_shape, seed=0, context=run)
    mm = tile_mismatch(net, image, halo=halo, crop_shape=ms.mismatch_crop, stride=ms.mismatch_stride,
                       tile=ms.mismatch_tile, offset=ms.mismatch_offset, max_crops=ms.max_crops, context=run,
                       progress=progress)
    points = []
    if sweep:
        sizes = ms.sweep_sizes or _default_sweep(image.shape[1:], halo, divisor)
        points = tile_size_sweep(net, image, targets, halo=halo, tile_sizes=sizes, context=run).points
    independent = _independent_scores(model, cfg, dataset, tile, halo, dev, base_dir)
    if figures_dir is not None:
        _variant_figures(figures_dir, dataset.name, variant.name, mm, disp)
    log_rows = info.extra.get("train_seconds")
    return VariantResult(
        dataset=dataset.name,
        variant=variant.name,
        norm=variant.norm,
        input_normalization=variant.input_normalization,
        channels=channels,
        steps=info.step,
        train_seconds=float(log_rows) if log_rows is not None else None,
        budget=str(info.extra.get("study_budget", "")),
        dice_eval=dice_eval,
        dice_train=dice_train,
        disparity=list(disp.disparity) if disp.disparity is not None else None,
        disparity_batch=disp.batch_composition,
        mismatch=[float(v) for v in mm.mismatch],
        max_dist=float(mm.max_dist),
        mismatch_geometry=mm.geometry.model_dump(mode="json"),
        sweep=[{"tile_shape": list(p.tile_shape), "score": list(p.score)} for p in points],
        halo=list(halo),
        predict_tile=list(tile),
        validation_shape=list(image.shape[1:]),
        device=str(dev),
        seed=seed,
        independent=independent,
    )


def _independent_scores(model: torch.nn.Module, cfg: TrainConfig, dataset: StudyDataset, tile: tuple[int, ...],
                        halo: tuple[int, ...], device: Any, base_dir: Any) -> list[IndependentScore] | None:
    """Dice on the dataset's independent images, each normalized on its own as the run's input normalization
    says (global: quantiles of that whole image; tile-wise: of every tile), tiles and halo of the held-out run."""
    if not dataset.independent:
        return None
    from .data import fit_normalization, instances_to_targets, load_independent
    from .metrics import TilewiseNormalized, independent_dice
    from .tiling import TiledPredictor

    settings = cfg.data.input_normalization
    t = cfg.data.targets
    if settings.mode == "tilewise":
        net: torch.nn.Module = TilewiseNormalized.from_settings(model, settings)

        def preprocess(raw: np.ndarray) -> np.ndarray:
            return raw
    else:
        net = model

        def preprocess(raw: np.ndarray) -> np.ndarray:
            return fit_normalization(settings, raw).apply(raw)

    def targets(labels: np.ndarray, _channels: int) -> np.ndarray:
        return instances_to_targets(labels, boundary_width=t.boundary_width, background=t.background,
                                    fill_holes=t.fill_holes)

    predict = TiledPredictor(net, tile, halo, batch_size=1, device=device).predict
    channels = cfg.model.in_channels if cfg.model is not None else None
    scores: list[IndependentScore] = []
    for spec in dataset.independent:
        images = load_independent(spec, base_dir, dims=len(tile), channels=channels)
        scores += independent_dice(predict, images, preprocess=preprocess, targets=targets,
                                   threshold=dataset.measure.threshold)
    return scores


def norm_has_running_stats(model: torch.nn.Module) -> bool:
    from .metrics import norm_layers

    return bool(norm_layers(model)[0])


def _default_sweep(spatial: Sequence[int], halo: Sequence[int], divisor: Sequence[int]) -> list[int]:
    smallest = max(2 * h + 2 * d for h, d in zip(halo, divisor, strict=True))
    largest = max(spatial)
    sizes = {int(-(-smallest // 16) * 16)}
    s = 32
    while s < largest:
        if s > smallest:
            sizes.add(s)
        s *= 2
    sizes.add(int(-(-largest // max(divisor)) * max(divisor)))
    return sorted(sizes)


def _variant_figures(folder: Path, dataset: str, variant: str, mm: Any, disp: Any) -> None:
    from .report.figures import disparity_figure, tile_mismatch_figure

    folder.mkdir(parents=True, exist_ok=True)
    for kind, png in (("mismatch", tile_mismatch_figure(mm)), ("disparity", disparity_figure(disp))):
        if png:
            tmp = folder / f".{dataset}_{variant}_{kind}.png.tmp"
            tmp.write_bytes(png)
            os.replace(tmp, folder / f"{dataset}_{variant}_{kind}.png")


# -- running --------------------------------------------------------------------------------------------
def _train_run(cfg: TrainConfig, run_dir: Path, base_dir: Path | None, device: str | None, progress: bool,
               budget: Budget) -> tuple[Path, float | None]:
    from .checkpoint import load_checkpoint
    from .train import Trainer

    last = run_dir / "last.pt"
    if last.exists():
        _, info = load_checkpoint(last)
        stored = info.extra.get("train_config")
        same = stored is not None and TrainConfig.model_validate(stored) == cfg
        if same and info.step >= cfg.steps:
            logger.info("%s: reusing the finished run (step %d)", run_dir, info.step)
            return last, info.extra.get("train_seconds")
        if same:
            logger.info("%s: resuming from step %d", run_dir, info.step)
            trainer = Trainer.resume(last, out_dir=run_dir, config=cfg, device=device, progress=progress)
        else:
            raise ValueError(
                f"{run_dir} holds a run with a different config; delete it or use another out_dir "
                "(the study never overwrites a run)"
            )
    else:
        trainer = Trainer(cfg, run_dir, base_dir=base_dir, device=device, progress=progress)
    trainer.extra["study_budget"] = budget
    result = trainer.fit()  # keeps the wall-clock training time in every checkpoint, across resumes
    if result.interrupted:
        raise KeyboardInterrupt
    return result.last, trainer.extra["train_seconds"]


def seed_run_dir(config: StudyConfig, dataset: str, variant: str, seed: int, budget: Budget) -> Path:
    """Run folder of a repeat: OUT_DIR/DATASET/seeds/BUDGET/VARIANT/seedN/ (each machine class its own)."""
    return config.out_dir / dataset / "seeds" / budget / variant / f"seed{seed}"


def seed_plan(config: StudyConfig, budget: Budget) -> list[tuple[StudyDataset, StudyVariant, int]]:
    """Every repeat of the study on this machine class: ``(dataset, variant, seed)``, seeds outermost."""
    by_name = {v.name: v for v in config.variants}
    plan = []
    for ds in config.datasets:
        if ds.seeds is None:
            continue
        for seed in ds.seeds.seeds.get(budget, []):
            plan += [(ds, by_name[name], seed) for name in ds.seeds.variants if name in by_name]
    return plan


def run_study(
    config: StudyConfig,
    *,
    budget: str = "auto",
    datasets: Sequence[str] | None = None,
    variants: Sequence[str] | None = None,
    device: str | None = None,
    base_dir: str | os.PathLike[str] | None = None,
    command: str | None = None,
    progress: bool = False,
    runs: StudyRunSet = "all",
) -> list[VariantResult]:
    """Train (or reuse) and measure every selected dataset x variant, then the selected repeats (``seeds``);
    write the report. ``runs`` picks the main table, the repeats or both. Returns the rows."""
    b = pick_budget(budget)
    base = Path(base_dir) if base_dir is not None else None
    known_ds = {d.name for d in config.datasets}
    known_v = {v.name for v in config.variants}
    for sel, known, what in ((datasets, known_ds, "dataset"), (variants, known_v, "variant")):
        unknown = set(sel or ()) - known
        if unknown:
            raise ValueError(f"unknown {what}(s) {sorted(unknown)}; the config has {sorted(known)}")
    figures = _figures_dir(config.report)
    rows: list[VariantResult] = []

    def selected(ds: StudyDataset, v: StudyVariant) -> bool:
        return (not datasets or ds.name in datasets) and (not variants or v.name in variants)

    if runs in ("all", "main"):
        for ds in config.datasets:
            for v in config.variants:
                if not selected(ds, v):
                    continue
                run_dir = config.out_dir / ds.name / v.name
                cfg = variant_config(ds, v, b)
                logger.info("study: %s / %s (%s budget, %d steps)", ds.name, v.name, b, cfg.steps)
                ckpt, _ = _train_run(cfg, run_dir, base, device, progress, b)
                row = measure_variant(ckpt, ds, v, base_dir=base, device=device or cfg.device, figures_dir=figures)
                atomic_write_text(run_dir / "measure.json", row.model_dump_json(indent=2))
                rows.append(row)
    if runs in ("all", "seeds"):
        plan = [(ds, v, seed) for ds, v, seed in seed_plan(config, b) if selected(ds, v)]
        if not plan:
            logger.warning("study: no repeats with other seeds for the %s budget in the selection (a dataset's "
                           "seeds block lists them per machine class)", b)
        for ds, v, seed in plan:
            run_dir = seed_run_dir(config, ds.name, v.name, seed, b)
            cfg = variant_config(ds, v, b, seed=seed)
            main_dir = config.out_dir / ds.name / v.name
            if cfg == variant_config(ds, v, b) and (main_dir / "last.pt").exists():
                train_dir = main_dir  # this repeat is the main table's run: trained once, measured as a repeat
            else:
                train_dir = run_dir
            logger.info("study: %s / %s seed %d (%s budget, %d steps)", ds.name, v.name, seed, b, cfg.steps)
            ckpt, _ = _train_run(cfg, train_dir, base, device, progress, b)
            row = measure_variant(ckpt, ds, v, base_dir=base, device=device or cfg.device, seed=seed, sweep=False)
            atomic_write_text(run_dir / "measure.json", row.model_dump_json(indent=2))
            rows.append(row)
    write_study_report(config, budget=b, command=command)
    return rows


# -- report ----------------------------------------------------------------------------------------------
def _figures_dir(report: Path) -> Path:
    return report.parent / f"{report.stem}_figures"


def load_results(config: StudyConfig) -> list[VariantResult]:
    """The main table's rows that have been measured (``measure.json``)."""
    rows = []
    for ds in config.datasets:
        for v in config.variants:
            path = config.out_dir / ds.name / v.name / "measure.json"
            if path.exists():
                rows.append(VariantResult.model_validate(json.loads(path.read_text())))
    return rows


def load_seed_results(config: StudyConfig, budget: Budget) -> list[VariantResult]:
    """The repeats of this machine class that have been measured."""
    rows = []
    for ds, v, seed in seed_plan(config, budget):
        path = seed_run_dir(config, ds.name, v.name, seed, budget) / "measure.json"
        if path.exists():
            row = VariantResult.model_validate(json.loads(path.read_text()))
            if row.budget == budget:
                rows.append(row)
    return rows


# -- statistics over seeds ---------------------------------------------------------------------------------
def _mean_sd(values: Sequence[float], fmt: str = "{:.3f}") -> str:
    if len(values) < 2:
        return fmt.format(values[0]) if values else "n/a"
    return f"{fmt.format(np.mean(values))} ± {fmt.format(np.std(values, ddof=1))}"


@dataclass(frozen=True)
class PairedTest:
    """Two variants compared seed by seed (same initialization and tile order): ``d = value_a - value_b``."""

    a: str
    b: str
    n: int
    mean: float
    """Mean of ``a - b`` over the shared seeds."""
    sd: float
    p: float | None
    """Two-sided paired t-test p-value (None: fewer than 3 seeds, or every seed within the tolerance)."""
    higher_is_better: bool
    equal: bool
    """Every per-seed difference is within the metric's tolerance."""


MIN_SEEDS = 3
"""Fewer shared seeds than this give no ordering: a t-test on 2 differences says next to nothing."""


def paired_test(a: str, b: str, xa: dict[int, float], xb: dict[int, float], *, higher_is_better: bool,
                atol: float = 0.0) -> PairedTest:
    """The paired t-test of two variants' per-seed values (seeds both have)."""
    from scipy import stats

    seeds = sorted(set(xa) & set(xb))
    d = np.array([xa[s] - xb[s] for s in seeds], dtype=np.float64)
    n = len(d)
    mean = float(d.mean()) if n else 0.0
    sd = float(d.std(ddof=1)) if n > 1 else 0.0
    equal = bool(n) and bool(np.all(np.abs(d) <= atol))
    p = None
    if n >= MIN_SEEDS and not equal:  # the same gap on every seed (sd 0) is certain; scipy would give nan
        p = 0.0 if sd == 0.0 else float(stats.ttest_rel([xa[s] for s in seeds], [xb[s] for s in seeds]).pvalue)
    return PairedTest(a, b, n, mean, sd, p, higher_is_better, equal)


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values (None stays None): the family's error rate stays at the level."""
    order = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    out: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        out[i] = running
    return out


def paired_ordering(test: PairedTest, p_adjusted: float | None = None, *, level: float = 0.05) -> str:
    """One statement: ``a > b`` ('>' is better) when the (adjusted) p-value is below ``level``, ``a ≈ b`` when
    the seeds do not resolve the difference, ``a = b`` within the tolerance on every seed, ``a ? b`` with too
    few seeds. Differences print as ``a - b``."""
    t = test
    p = t.p if p_adjusted is None else p_adjusted
    spread = f"{t.a} - {t.b} = {t.mean:+.3g} ± {t.sd:.3g} over {t.n} seeds"
    if t.equal:
        return f"{t.a} = {t.b} (equal on every seed)"
    if t.n < MIN_SEEDS or p is None:
        return f"{t.a} ? {t.b} ({spread}; fewer than {MIN_SEEDS} seeds: no ordering)"
    if p < level:
        a_better = (t.mean > 0) == t.higher_is_better
        hi, lo = (t.a, t.b) if a_better else (t.b, t.a)
        return f"{hi} > {lo} ({spread}; p = {p:.2g})"
    return f"{t.a} ≈ {t.b} ({spread}; p = {p:.2g}, not resolved)"


def _seed_values(rows: Sequence[VariantResult], variant: str, pick: Any) -> dict[int, float]:
    out = {}
    for r in rows:
        if r.variant == variant and r.seed is not None:
            v = pick(r)
            if v is not None:
                out[r.seed] = float(v)
    return out


#: The figures compared across seeds: label, value of a row (None: not applicable), higher is better, and the
#: tolerance within which two runs count as equal (Dice and disparity to 1e-3; max_dist to the gate's 1e-4).
_SEED_METRICS: list[tuple[str, Any, bool, float]] = [
    ("Dice eval, foreground", lambda r: r.dice_eval[0], True, 1e-3),
    ("Dice eval, boundary", lambda r: r.dice_eval[1] if len(r.dice_eval) > 1 else None, True, 1e-3),
    ("train/eval disparity, worst class", lambda r: max(r.disparity) if r.disparity else None, False, 1e-3),
    ("tile mismatch max_dist", lambda r: r.max_dist, False, 1e-4),
    ("Dice on the independent images, foreground",
     lambda r: r.dice_independent[0] if r.dice_independent else None, True, 1e-3),
]


def _seed_section(config: StudyConfig, ds: StudyDataset, rows: list[VariantResult], budget: Budget) -> list[str]:
    assert ds.seeds is not None
    seeds = ds.seeds.seeds.get(budget, [])
    names = [n for n in ds.seeds.variants if any(r.variant == n for r in rows)]
    first = next(v for v in config.variants if v.name == names[0])
    v0 = variant_config(ds, first, budget, seed=seeds[0])
    main_steps = variant_config(ds, first, budget).steps
    done = {(r.variant, r.seed) for r in rows}
    missing = [f"{n} seed {s}" for s in seeds for n in ds.seeds.variants if (n, s) not in done]
    lines = [
        f"### {ds.name}: {len(seeds)} seeds",
        "",
        f"{', '.join(ds.seeds.variants)} trained again with seeds {', '.join(map(str, seeds))} (the seed sets the "
        "network's initialization and the order of the training tiles; runs with the same seed see the same tiles, "
        f"so variants are compared seed by seed). Budget ({budget}): {v0.steps} steps of batch {v0.batch_size} x "
        f"{v0.grad_accumulation} accumulated passes on tiles {list(v0.data.tile_shape)}, BatchRenorm warm-up "
        f"{v0.schedule.warmup_steps} steps, ramp {v0.schedule.ramp_steps} steps"
        + (f", shorter than the main table's {main_steps} steps" if v0.steps < main_steps else "")
        + ". Mean ± standard deviation over the seeds; values are foreground / boundary."
        + (f" Not measured yet: {', '.join(missing)}." if missing else ""),
        "",
    ]
    n_images = max((len(r.independent or []) for r in rows), default=0)
    indep = f"{n_images} image{'s' if n_images != 1 else ''}" if n_images else ""
    head = "| norm | input norm | seeds | Dice eval | disparity | max_dist |" + (
        f" Dice independent (mean of {indep}) |" if indep else "")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for name in names:
        rs = [r for r in rows if r.variant == name]
        per_class = range(len(rs[0].dice_eval))
        dice_eval = " / ".join(_mean_sd([r.dice_eval[c] for r in rs]) for c in per_class)
        disp = ("n/a" if rs[0].disparity is None else
                " / ".join(_mean_sd([r.disparity[c] for r in rs if r.disparity]) for c in per_class))
        row = (f"| {rs[0].norm} | {rs[0].input_normalization} | {len(rs)} | {dice_eval} | {disp} | "
               f"{_mean_sd([r.max_dist for r in rs], '{:.2g}')} |")
        if indep:
            ind = [r.dice_independent for r in rs if r.dice_independent]
            row += (" " + " / ".join(_mean_sd([v[c] for v in ind]) for c in per_class) + " |") if ind else " n/a |"
        lines.append(row)
    tests: list[tuple[str, PairedTest]] = []
    for label, pick, higher, atol in _SEED_METRICS:
        vals = {n: _seed_values(rows, n, pick) for n in names}
        have = [n for n in names if vals[n]]
        tests += [(label, paired_test(a, b, vals[a], vals[b], higher_is_better=higher, atol=atol))
                  for i, a in enumerate(have) for b in have[i + 1:]]
    adjusted = holm([t.p for _, t in tests])
    lines += ["", f"Orderings, from the spread: each pair compared seed by seed (a paired t-test, at least {MIN_SEEDS} "
              f"seeds), p-values Holm-corrected for the {sum(p is not None for p in adjusted)} tests of this section; "
              "'>' is better at the 5% level, '≈' when the seeds do not resolve the difference, '=' when every seed "
              "agrees within the metric's tolerance (1e-3; max_dist 1e-4).", ""]
    for label, *_ in _SEED_METRICS:
        mine = [paired_ordering(t, p) for (lab, t), p in zip(tests, adjusted, strict=True) if lab == label]
        if mine:
            lines.append(f"- **{label}**: " + "; ".join(mine) + ".")
    lines += ["", "Every run:", "", "| variant | seed | steps | Dice eval | disparity | max_dist |"
              + (" Dice independent |" if indep else ""),
              "|---|---|---|---|---|---|" + ("---|" if indep else "")]
    for r in sorted(rows, key=lambda r: (names.index(r.variant), r.seed or 0)):
        lines.append(f"| {r.variant} | {r.seed} | {r.steps} | {_pair(r.dice_eval)} | {_pair(r.disparity)} | "
                     f"{r.max_dist:.2g} |" + (f" {_pair(r.dice_independent)} |" if indep else ""))
    if n_images:
        image_names = list(dict.fromkeys(s.name for r in rows for s in r.independent or []))
        lines += ["", "Foreground Dice per independent image (mean ± sd over the seeds):", "",
                  "| image | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for image in image_names:
            cells = []
            for name in names:
                vals = [s.dice[0] for r in rows if r.variant == name for s in r.independent or [] if s.name == image]
                cells.append(_mean_sd(vals) if vals else "n/a")
            lines.append(f"| {image} | " + " | ".join(cells) + " |")
    if ds.independent:
        lines += ["", "Independent images (each normalized on its own, as the variant's input normalization says):",
                  ""]
        for spec in ds.independent:
            planes = f", planes {spec.planes}" if spec.planes else ""
            lines.append(f"- `{spec.name}`: {spec.description}{planes}. Source: {spec.source}. Licence: "
                         f"{spec.license}.")
    return [*lines, ""]


def _pair(values: Sequence[float] | None, fmt: str = "{:.3f}") -> str:
    if values is None:
        return "n/a"
    return " / ".join(fmt.format(v) for v in values)


def _sweep_plot(rows: list[VariantResult], path: Path, channel: int = 0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), constrained_layout=True)
    for r in rows:
        xs = [int(np.prod(p["tile_shape"]) ** (1 / len(p["tile_shape"]))) for p in r.sweep]
        ax.plot(xs, [p["score"][channel] for p in r.sweep], marker="o", label=r.variant)
    name = rows[0].channels[channel] if rows else ""
    ax.set(xscale="log", xlabel="tile size (voxels per axis, geometric mean)", ylabel=f"Dice ({name})",
           title=f"{rows[0].dataset if rows else ''}: performance vs tile size")
    ax.legend(fontsize=7)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_study_report(config: StudyConfig, *, budget: str = "cpu", command: str | None = None) -> Path:
    """Write the Markdown report (table, budget, command, figures) from the saved ``measure.json`` files."""
    rows = load_results(config)
    figures = _figures_dir(config.report)
    figures.mkdir(parents=True, exist_ok=True)
    rel = figures.name
    lines = [
        "# Normalization study: tiling artifacts and train/eval disparity on real data",
        "",
        "The paper's U-Net (2 downsamplings, 32/64/128 features) trained with each normalization and "
        "measured on the held-out part of each image (split by region), as in Table 1 of "
        "Buglakova et al. (ICCV 2025): Dice per class (foreground / boundary) with the network in eval mode and "
        "in train mode (normalization with the statistics of each tile, batch 1), train/eval disparity "
        "(1 - Dice between the two), and tile mismatch (two overlapping tiles of every crop, valid overlap "
        "only; 'no' when the maximum difference is exactly 0).",
        "",
        f"Produced by tilenorm-bmz {__version__} on {_machine()}. "
        f"Command: `{command or 'tilenorm-bmz study model_zoo/study.yaml'}` (finished runs are reused, so it "
        "can also run in pieces with --dataset / --variant). Training time: the sum of the step times logged in "
        "each run's metrics.csv (validation excluded; it survives interrupted and resumed runs), on a machine "
        "shared with other jobs.",
        "",
    ]
    for ds in config.datasets:
        ds_rows = [r for r in rows if r.dataset == ds.name]
        if not ds_rows:
            continue
        b = ds.budgets.get(budget)  # type: ignore[call-overload]
        v0 = variant_config(ds, config.variants[0], budget)  # type: ignore[arg-type]
        scored = any(r.independent for r in ds_rows)  # the independent Dice column, when any row has it
        lines += [
            f"## {ds.name}",
            "",
            f"Training budget ({budget}): {v0.steps} steps of batch {v0.batch_size} x {v0.grad_accumulation} "
            f"accumulated passes on tiles {list(v0.data.tile_shape)}, Adam lr {v0.lr}; BatchRenorm warm-up "
            f"{v0.schedule.warmup_steps} steps, ramp {v0.schedule.ramp_steps} steps to r_max {v0.schedule.r_max}, "
            f"d_max {v0.schedule.d_max}. Validation region {ds_rows[0].validation_shape}, predicted with tiles "
            f"{ds_rows[0].predict_tile} and halo {ds_rows[0].halo}."
            + (" " + _budget_note(b) if b is not None else ""),
            "",
            "| norm | input norm | Dice eval | Dice train mode | disparity | tile mismatch | max_dist | train time |"
            + (" Dice independent |" if scored else ""),
            "|---|---|---|---|---|---|---|---|" + ("---|" if scored else ""),
        ]
        for r in ds_rows:
            mismatch = "no" if r.seamless else _pair(r.mismatch)
            t = _duration(_step_seconds(config.out_dir / ds.name / r.variant / "metrics.csv"))
            lines.append(
                f"| {r.norm} | {r.input_normalization} | {_pair(r.dice_eval)} | {_pair(r.dice_train)} | "
                f"{_pair(r.disparity)} | {mismatch} | {r.max_dist:.2g} | {t} |"
                + (f" {_pair(r.dice_independent)} |" if scored else "")
            )
        seamless = [r.variant for r in ds_rows if r.seamless]
        stable = [r.variant for r in ds_rows if r.disparity is not None and max(r.disparity) <= 0.05]
        both = [v for v in seamless if v in stable]
        lines += [
            "",
            f"Seamless (max_dist exactly 0): {', '.join(seamless) or 'none'}. Train/eval disparity <= 0.05 on every "
            f"class among the networks with running statistics: {', '.join(stable) or 'none'}. Both: "
            f"**{', '.join(both) or 'none'}**.",
            "",
            "Values are foreground / boundary. Disparity 'n/a': the network has no running statistics, so train "
            f"and eval mode compute the same. Disparity probe: {ds_rows[0].disparity_batch or ''}.",
            "",
        ]
        twins = _batchnorm_instancenorm_twins(ds_rows)
        if twins:
            lines += [
                "BatchNorm's train-mode Dice equals InstanceNorm's Dice exactly "
                f"({' and '.join(twins)} input normalization): with batch size 1, BatchNorm in train mode normalizes "
                "each channel over the tile's spatial axes, which is InstanceNorm with an affine transform; both "
                "variants start from the same seed and see the same tiles in the same order, so they train to the "
                "same network. BatchNorm differs only in eval mode, where its running statistics replace the "
                "tile's: that difference is the train/eval disparity.",
                "",
            ]
        sweep_png = figures / f"{ds.name}_sweep.png"
        _sweep_plot(ds_rows, sweep_png)
        lines += [f"![Dice vs tile size, {ds.name}]({rel}/{sweep_png.name})", ""]
        for r in ds_rows:
            for kind, caption in (("mismatch", "tile mismatch at the worst crop"),
                                  ("disparity", "train vs eval prediction")):
                png = figures / f"{ds.name}_{r.variant}_{kind}.png"
                if png.exists() and r.variant in _FIGURE_VARIANTS[kind]:
                    lines += [f"**{r.variant}**, {caption}:", "", f"![{r.variant} {kind}]({rel}/{png.name})", ""]
    seed_rows = load_seed_results(config, budget)  # type: ignore[arg-type]
    if seed_rows:
        lines += ["## Repeats with other seeds: mean, spread and orderings", ""]
        for ds in config.datasets:
            ds_seed_rows = [r for r in seed_rows if r.dataset == ds.name]
            if ds_seed_rows:
                lines += _seed_section(config, ds, ds_seed_rows, budget)  # type: ignore[arg-type]
    atomic_write_text(config.report, "\n".join(lines).rstrip() + "\n")
    return config.report


def _batchnorm_instancenorm_twins(rows: list) -> list[str]:
    """Input normalizations under which BatchNorm (train mode) and InstanceNorm gave identical Dice."""
    twins = []
    for bn in rows:
        if bn.norm != "batchnorm" or bn.dice_train is None:
            continue
        for inorm in rows:
            same = inorm.norm == "instancenorm" and inorm.input_normalization == bn.input_normalization
            if same and inorm.dice_eval is not None and np.allclose(bn.dice_train, inorm.dice_eval, rtol=0, atol=1e-12):
                twins.append(bn.input_normalization)
    return twins


_FIGURE_VARIANTS = {
    "mismatch": {"batchrenorm", "instancenorm", "batchnorm-tilewise", "instancenorm-tilewise"},
    "disparity": {"batchnorm", "batchrenorm"},
}


def _step_seconds(metrics_csv: Path) -> float | None:
    """Sum of the step times a run logged (None when the run left no log)."""
    import csv

    if not metrics_csv.exists():
        return None
    with metrics_csv.open(newline="") as f:
        return sum(float(row["seconds"]) for row in csv.DictReader(f) if row.get("seconds"))


def _duration(seconds: float | None) -> str:
    if not seconds:
        return ""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def _budget_note(b: StudyBudget) -> str:
    return "Budget overrides: " + ", ".join(f"{k} {v}" for k, v in b.model_dump(exclude_none=True).items()) + "."


def _machine() -> str:
    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(0)}"
    return f"CPU, {os.cpu_count()} cores, torch {torch.__version__}"
