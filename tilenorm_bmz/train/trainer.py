"""The training loop: Dice loss, Adam, gradient accumulation, the BatchRenorm schedule, validation,
atomic checkpoints (last and best) and exact resume.

A run folder holds ``config.yaml`` (the validated config), ``last.pt``, ``best.pt``, ``metrics.csv`` and
``curves.png``. Every checkpoint carries what :func:`Trainer.resume` needs to continue the exact same run:
model, optimizer, global step, schedule, sampler state and torch RNG state.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..checkpoint import ArchitectureSpec, CheckpointInfo, architecture_of, load_checkpoint, save_checkpoint
from ..config import TrainConfig, atomic_write_text
from ..data import build_training_data
from ..data.dataset import TrainingData
from ..introspect import resolve_device
from ..models import UNet
from ..norm import BatchRenorm
from ..progress import progress_bar
from .loss import dice_loss

__all__ = ["StepLog", "TrainResult", "Trainer", "resolve_device", "train"]

logger = logging.getLogger(__name__)

#: extra["validation_data"] lists where the held-out data came from, so ``package`` can use it as sample.
VALIDATION_DATA_KEY = "validation_data"


#: checkpoint extra entries that describe the run's origin and are carried through a resume
_CARRIED_EXTRA = ("converted_from", "source_kind", "conversion", "train_seconds", "study_budget")


@dataclass
class StepLog:
    """One row of ``metrics.csv``."""

    step: int
    loss: float
    r_max: float | None
    d_max: float | None
    seconds: float
    val_dice: dict[str, float] = field(default_factory=dict)
    disparity: dict[str, float] = field(default_factory=dict)

    def row(self, channels: list[str]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "step": self.step,
            "loss": f"{self.loss:.6f}",
            "r_max": "" if self.r_max is None else f"{self.r_max:.4f}",
            "d_max": "" if self.d_max is None else f"{self.d_max:.4f}",
            "seconds": f"{self.seconds:.3f}",
        }
        for c in channels:
            out[f"val_dice_{c}"] = f"{self.val_dice[c]:.5f}" if c in self.val_dice else ""
            out[f"disparity_{c}"] = f"{self.disparity[c]:.5f}" if c in self.disparity else ""
        return out


@dataclass
class TrainResult:
    """What a finished (or interrupted) run produced."""

    out_dir: Path
    last: Path
    best: Path | None
    step: int
    best_score: float | None
    history: list[StepLog]
    interrupted: bool = False

    @property
    def last_validation(self) -> StepLog | None:
        return next((h for h in reversed(self.history) if h.val_dice), None)


def _has_batchrenorm(model: nn.Module) -> bool:
    return any(isinstance(m, BatchRenorm) for m in model.modules())


def _validation_halo(model: nn.Module, dims: int) -> tuple[int, ...]:
    from ..tiling.receptive_field import analytic_receptive_field, receptive_field, round_halo

    divisor = tuple(getattr(model, "divisor", (1,) * dims))
    analytic = analytic_receptive_field(model, dims, divisor)
    if analytic is not None:
        left, right = analytic
        return round_halo([max(a, b) for a, b in zip(left, right, strict=True)], divisor)
    return tuple(receptive_field(model, dims, n_samples=2).recommended_halo)


def _input_statistics(fitted: list[Any]) -> dict[str, Any] | None:
    """Per-channel ``low``/``high`` of the training images (mean over images): what ``package --input-norm
    fixed`` turns into a fixed ``scale_linear``, so consumers that preprocess per tile (ilastik) stay exact."""
    los = [f.lo for f in fitted if f.lo is not None]
    his = [f.hi for f in fitted if f.hi is not None]
    if not los:
        return None
    return {
        "low": [float(v) for v in np.mean(los, axis=0)],
        "high": [float(v) for v in np.mean(his, axis=0)],
        "per_image": [f.to_dict() for f in fitted],
    }


def _disparity_tiles(images: list[np.ndarray], tile: tuple[int, ...], divisor: tuple[int, ...], n: int,
                     seed: int) -> list[np.ndarray]:
    """``n`` random tiles (the training tile, shrunk to fit every image) spread over the images."""
    shape = tuple(
        max(d, (min([t, *(im.shape[1 + a] for im in images)]) // d) * d)
        for a, (t, d) in enumerate(zip(tile, divisor, strict=True))
    )
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        im = images[i % len(images)]
        start = [int(rng.integers(0, max(1, s - t + 1))) for s, t in zip(im.shape[1:], shape, strict=True)]
        sl = (slice(None), *(slice(a, a + t) for a, t in zip(start, shape, strict=True)))
        crop = im[sl]
        pad = [(0, 0)] + [(0, t - c) for c, t in zip(crop.shape[1:], shape, strict=True)]
        out.append(np.pad(crop, pad) if any(p[1] for p in pad) else np.ascontiguousarray(crop))
    return out


def _val_tile(train_tile: tuple[int, ...], halo: tuple[int, ...], divisor: tuple[int, ...],
              region: tuple[int, ...]) -> tuple[int, ...]:
    """A validation tile: at least the training tile, with an inner part >= the halo, at most the region."""
    out = []
    for t, h, d, s in zip(train_tile, halo, divisor, region, strict=True):
        want = max(t, 2 * h + max(2 * h, d))
        cap = math.ceil(s / d) * d
        out.append(max(min(math.ceil(want / d) * d, cap), math.ceil((2 * h + d) / d) * d))
    return tuple(out)


class Trainer:
    """Train a network on the data of a :class:`~tilenorm_bmz.config.TrainConfig`.

    Parameters
    ----------
    config
        The run configuration. ``config.model`` builds a :class:`~tilenorm_bmz.models.UNet`; when it is
        ``None`` a ``model`` must be given (fine-tuning a converted network).
    out_dir
        Run folder (created): ``config.yaml``, ``last.pt``, ``best.pt``, ``metrics.csv``, ``curves.png``.
    model, architecture
        An existing network to train and how to rebuild it (default: :func:`architecture_of` the model).
    base_dir
        Folder that relative data paths in the config are relative to (the config file's folder).
    progress
        Show a rich progress bar with step, loss, r_max/d_max and the last validation scores.
    extra
        Metadata carried into every checkpoint (e.g. what a fine-tuned model was converted from).
    """

    def __init__(
        self,
        config: TrainConfig,
        out_dir: str | os.PathLike[str],
        *,
        model: nn.Module | None = None,
        architecture: ArchitectureSpec | None = None,
        base_dir: str | os.PathLike[str] | None = None,
        device: str | None = None,
        progress: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.out_dir = Path(out_dir)
        self.device = resolve_device(device or config.device)
        self.progress = progress
        self.extra = dict(extra or {})
        self._clock: tuple[float, float] | None = None  # (fit start, train_seconds before it) while fitting
        self.base_dir = Path(base_dir) if base_dir is not None else None
        self.data: TrainingData = build_training_data(config.data, base_dir=base_dir, progress=False)
        if model is None:
            if config.model is None:
                raise ValueError("the config has no model section; add one (e.g. model: {dims: 3, features: 32})")
            torch.manual_seed(config.seed)
            model = UNet.from_config(config.model)
        self.model = model.to(self.device)
        self.architecture = architecture or architecture_of(model)
        if self.architecture is None:
            raise ValueError(f"cannot checkpoint a {type(model).__name__}: pass architecture=ArchitectureSpec(...)")
        self._check_model_against_data()
        self.dims = self.data.dims
        self.divisor = tuple(getattr(self.model, "divisor", (1,) * self.dims))
        bad = [t % d for t, d in zip(config.data.tile_shape, self.divisor, strict=True)]
        if any(bad):
            raise ValueError(
                f"data.tile_shape {list(config.data.tile_shape)} is not a multiple of the network divisor "
                f"{list(self.divisor)}"
            )
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.use_renorm = _has_batchrenorm(self.model)
        amp = config.amp if self.device.type == "cuda" else "none"
        if config.amp != "none" and self.device.type != "cuda":
            logger.warning("amp %s is only used on CUDA; training in float32 on %s", config.amp, self.device)
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
        self.step = 0
        self.best_score: float | None = None
        self.history: list[StepLog] = []
        self.halo = _validation_halo(self.model, self.dims)
        for msg in config.advice():
            logger.warning(msg)

    # -- set-up -------------------------------------------------------------------------------------
    def _check_model_against_data(self) -> None:
        in_ch = getattr(self.model, "in_channels", None)
        if isinstance(in_ch, int) and in_ch != self.data.in_channels:
            raise ValueError(
                f"the network takes {in_ch} input channel(s) but the images have {self.data.in_channels}; "
                f"set model.in_channels: {self.data.in_channels}"
            )
        out_ch = getattr(self.model, "out_channels", None)
        if isinstance(out_ch, int) and out_ch != self.data.out_channels:
            raise ValueError(
                f"the network predicts {out_ch} channel(s) but the targets have {self.data.out_channels} "
                f"({', '.join(self.data.channel_names)})"
            )

    @classmethod
    def resume(
        cls,
        checkpoint: str | os.PathLike[str],
        *,
        out_dir: str | os.PathLike[str] | None = None,
        config: TrainConfig | None = None,
        device: str | None = None,
        trust_code: bool = False,
        progress: bool = False,
        opened: tuple[nn.Module, CheckpointInfo] | None = None,
    ) -> Trainer:
        """Continue the run saved in ``checkpoint`` exactly (step, schedule, optimizer, sampler, RNG).

        ``config`` may raise ``steps``; the config stored in the checkpoint is used otherwise. ``trust_code``:
        build a stored architecture that is code (see :func:`~tilenorm_bmz.checkpoint.build_model`).
        ``opened``: the checkpoint's model and info as already loaded (the CLI opens every model through
        :func:`tilenorm_bmz.bmz.opening.open_model`), so it is not read twice.
        """
        model, info = opened if opened is not None else load_checkpoint(checkpoint, trust_code=trust_code)
        stored = info.extra.get("train_config")
        if stored is None:
            raise ValueError(f"{checkpoint} is not a training checkpoint (no train_config): it cannot be resumed")
        cfg = config or TrainConfig.model_validate(stored)
        base = info.extra.get("base_dir")
        trainer = cls(cfg, out_dir or Path(checkpoint).parent, model=model, architecture=info.architecture,
                      base_dir=base, device=device, progress=progress,
                      extra={k: v for k, v in info.extra.items() if k in _CARRIED_EXTRA})
        trainer._restore(info)
        return trainer

    def _restore(self, info: CheckpointInfo) -> None:
        self.step = info.step
        if info.optimizer_state is not None:
            self.optimizer.load_state_dict(info.optimizer_state)
        state = info.extra.get("trainer_state") or {}
        if "sampler" in state:
            self.data.train.load_state_dict(state["sampler"])
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.best_score = state.get("best_score")
        csv_path = self.out_dir / "metrics.csv"
        if csv_path.exists():
            self.history = [h for h in _read_history(csv_path, self.data.channel_names) if h.step <= self.step]

    # -- checkpoints --------------------------------------------------------------------------------
    def _validation_data(self) -> list[dict[str, Any]]:
        """Where each validation region comes from (``package`` uses it as sample data)."""
        cfg = self.config.data
        resolved = cfg.resolve_paths(self.base_dir) if self.base_dir is not None else cfg
        label_of = {str(Path(i).resolve()): str(Path(lab).resolve())
                    for i, lab in zip(resolved.images, resolved.labels, strict=True)}
        out = []
        for item in self.data.validation:
            path = getattr(item.image, "path", None)
            image = str(Path(path).resolve()) if path is not None and cfg.sample is None else None
            out.append({
                "name": item.name,
                "sample": cfg.sample,
                "image": image,
                "labels": label_of.get(image) if image else None,
                "region": [[r.start, r.stop] for r in item.region],
            })
        return out

    def _checkpoint_extra(self, sampler_state: dict[str, Any] | None = None) -> dict[str, Any]:
        extra = dict(self.extra)
        if self._clock is not None:  # wall-clock training time so far, across resumes and interruptions
            extra["train_seconds"] = self._train_seconds()
        extra.update(
            train_config=self.config.model_dump(mode="json"),
            input_normalization=self.config.data.input_normalization.model_dump(mode="json"),
            channel_names=list(self.data.channel_names),
            tile_shape=list(self.config.data.tile_shape),
            halo=list(self.halo),
            base_dir=str(self.base_dir) if self.base_dir is not None else None,
            trainer_state={
                "sampler": sampler_state if sampler_state is not None else self.data.train.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "best_score": self.best_score,
            },
        )
        extra[VALIDATION_DATA_KEY] = self._validation_data()
        stats = _input_statistics(self.data.train.fitted)
        if stats is not None:
            extra["input_statistics"] = stats
        last = next((h for h in reversed(self.history) if h.val_dice), None)
        if last is not None:
            extra["validation"] = {"step": last.step, "dice": last.val_dice, "disparity": last.disparity}
        return extra

    def _train_seconds(self) -> float:
        """Wall-clock training time: what earlier runs recorded plus this ``fit`` so far."""
        assert self._clock is not None, "only while fitting"
        started, before = self._clock
        return before + time.perf_counter() - started

    def save(self, name: str = "last.pt", sampler_state: dict[str, Any] | None = None) -> Path:
        path = save_checkpoint(
            self.out_dir / name,
            self.model,
            step=self.step,
            optimizer=self.optimizer,
            schedule=self.config.schedule if self.use_renorm else None,
            architecture=self.architecture,
            **self._checkpoint_extra(sampler_state),
        )
        self._write_history()
        return path

    def _write_history(self) -> None:
        channels = list(self.data.channel_names)
        buf = io.StringIO()
        rows = [h.row(channels) for h in self.history]
        fields = list(StepLog(0, 0.0, None, None, 0.0).row(channels))
        writer = csv.DictWriter(buf, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.out_dir / "metrics.csv", buf.getvalue())

    # -- training -----------------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    def train_step(self) -> float:
        """One optimizer step (``grad_accumulation`` micro-batches); returns the mean loss."""
        cfg = self.config
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(cfg.grad_accumulation):
            x_np, y_np = self.data.train.batch(cfg.batch_size)
            x = torch.from_numpy(np.ascontiguousarray(x_np)).to(self.device, non_blocking=True)
            y = torch.from_numpy(np.ascontiguousarray(y_np)).to(self.device, non_blocking=True)
            with self._autocast():
                out = self.model(x)
            loss = dice_loss(out, y) / cfg.grad_accumulation
            self.scaler.scale(loss).backward()
            total += float(loss.detach())
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return total

    def validate(self) -> tuple[dict[str, float], dict[str, float]]:
        """Dice per class (eval mode, tiled prediction of every validation region) and train/eval disparity."""
        from ..metrics import dice, train_eval_disparity
        from ..tiling import TiledPredictor

        cfg = self.config
        channels = list(self.data.channel_names)
        scores: dict[str, list[float]] = {c: [] for c in channels}
        normalized: list[np.ndarray] = []
        self.model.eval()
        for item in self.data.validation:
            tile = cfg.val_tile_shape or _val_tile(cfg.data.tile_shape, self.halo, self.divisor, item.shape)
            if item.normalization.per_tile:
                image, pre = item.raw().astype(np.float32), item.normalization.apply
            else:
                image, pre = item.normalized(), None
                normalized.append(image)
            # the network as it is (weights keep their layout): training goes on, resuming must be exact
            predictor = TiledPredictor(self.model, tile, self.halo, batch_size=cfg.val_batch_size,
                                       device=self.device, preprocess=pre, optimize=False)
            pred = predictor.predict(image)
            d = dice(pred, item.targets, cfg.threshold, channel_axis=0)
            for c, v in zip(channels, np.atleast_1d(d), strict=True):
                scores[c].append(float(v))
        val = {c: float(np.mean(v)) for c, v in scores.items() if v}
        disparity: dict[str, float] = {}
        if cfg.disparity_tiles > 0 and normalized:
            tiles = _disparity_tiles(normalized, cfg.data.tile_shape, self.divisor, cfg.disparity_tiles, self.step)
            res = train_eval_disparity(self.model, tiles, batch_size=cfg.batch_size, threshold=cfg.threshold,
                                       device=self.device)
            if res.disparity is not None:
                disparity = {c: float(v) for c, v in zip(channels, res.disparity, strict=True)}
        self.model.train()
        return val, disparity

    def fit(self, steps: int | None = None, *, on_step: Callable[[StepLog], None] | None = None) -> TrainResult:
        """Train until global step ``steps`` (default ``config.steps``); Ctrl-C saves ``last.pt`` first."""
        cfg = self.config
        target = steps if steps is not None else cfg.steps
        self.out_dir.mkdir(parents=True, exist_ok=True)
        cfg.to_yaml(self.out_dir / "config.yaml")
        interrupted = False
        started = time.perf_counter()
        self._clock = (started, float(self.extra.get("train_seconds") or 0.0))
        with _progress_bar(self.progress, total=target, completed=self.step) as bar:
            while self.step < target:
                snapshot = self._snapshot()
                try:
                    limits = cfg.schedule.apply(self.model, self.step) if self.use_renorm else (None, None)
                    t0 = time.perf_counter()
                    loss = self.train_step()
                except KeyboardInterrupt:
                    self._rollback(snapshot)
                    self.save("last.pt", sampler_state=snapshot["sampler"])
                    interrupted = True
                    logger.warning("interrupted: saved step %d to %s", self.step, self.out_dir / "last.pt")
                    break
                self.step += 1
                log = StepLog(self.step, loss, limits[0], limits[1], time.perf_counter() - t0)
                if self.step % cfg.validate_every == 0 or self.step == target:
                    log.val_dice, log.disparity = self.validate()
                    score = float(np.mean(list(log.val_dice.values()))) if log.val_dice else None
                    self.history.append(log)
                    if score is not None and (self.best_score is None or score > self.best_score):
                        self.best_score = score
                        self.save("best.pt")
                    _plot_curves(self.history, self.out_dir / "curves.png")
                else:
                    self.history.append(log)
                if self.step % cfg.checkpoint_every == 0 or self.step == target:
                    self.save("last.pt")
                bar(log, self.best_score)
                if on_step is not None:
                    on_step(log)
        if not (self.out_dir / "last.pt").exists():
            self.save("last.pt")
        self.extra["train_seconds"] = self._train_seconds()
        self._clock = None
        logger.info("trained to step %d in %.1f s", self.step, time.perf_counter() - started)
        best = self.out_dir / "best.pt"
        return TrainResult(self.out_dir, self.out_dir / "last.pt", best if best.exists() else None, self.step,
                           self.best_score, self.history, interrupted)

    def _snapshot(self) -> dict[str, Any]:
        """What a step changes before the optimizer step: buffers (running statistics) and the sampler."""
        return {
            "buffers": {k: v.detach().clone() for k, v in self.model.named_buffers()},
            "sampler": self.data.train.state_dict(),
            "rng": torch.get_rng_state(),
        }

    def _rollback(self, snapshot: dict[str, Any]) -> None:
        with torch.no_grad():
            for name, buf in self.model.named_buffers():
                buf.copy_(snapshot["buffers"][name])
        self.optimizer.zero_grad(set_to_none=True)
        torch.set_rng_state(snapshot["rng"])


def train(
    config: TrainConfig,
    out_dir: str | os.PathLike[str],
    *,
    steps: int | None = None,
    resume: str | os.PathLike[str] | None = None,
    base_dir: str | os.PathLike[str] | None = None,
    device: str | None = None,
    progress: bool = False,
) -> TrainResult:
    """Train (or resume) a run; see :class:`Trainer`."""
    if resume is not None:
        trainer = Trainer.resume(resume, out_dir=out_dir, config=config, device=device, progress=progress)
    else:
        trainer = Trainer(config, out_dir, base_dir=base_dir, device=device, progress=progress)
    return trainer.fit(steps)


# -- metrics.csv / curves ---------------------------------------------------------------------------
def _read_history(path: Path, channels: list[str]) -> list[StepLog]:
    out: list[StepLog] = []
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            def f(key: str, row: dict[str, str] = row) -> float | None:
                v = row.get(key, "")
                return float(v) if v not in ("", None) else None

            log = StepLog(int(row["step"]), f("loss") or 0.0, f("r_max"), f("d_max"), f("seconds") or 0.0)
            log.val_dice = {c: v for c in channels if (v := f(f"val_dice_{c}")) is not None}
            log.disparity = {c: v for c in channels if (v := f(f"disparity_{c}")) is not None}
            out.append(log)
    return out


def _plot_curves(history: list[StepLog], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h.step for h in history]
    losses = [h.loss for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), constrained_layout=True)
    axes[0].plot(steps, losses, lw=0.8, color="0.4", label="loss")
    if len(losses) >= 20:
        k = max(5, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        axes[0].plot(steps[k - 1 :], smooth, color="C0", label=f"loss (mean of {k})")
    axes[0].set(xlabel="step", ylabel="Dice loss", title="training loss")
    axes[0].legend()
    val = [h for h in history if h.val_dice]
    for c in (val[0].val_dice if val else {}):
        axes[1].plot([h.step for h in val], [h.val_dice[c] for h in val], marker="o", label=f"Dice {c}")
        if val[0].disparity:
            axes[1].plot([h.step for h in val], [h.disparity.get(c, np.nan) for h in val], ls="--",
                         label=f"disparity {c}")
    axes[1].set(xlabel="step", ylim=(0, 1), title="validation (eval mode, tiled)")
    if val:
        axes[1].legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


# -- progress ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int, completed: int) -> Iterator[Callable[[StepLog, float | None], None]]:
    with progress_bar(enabled, total, "train", completed=completed) as advance:
        last_val = ""

        def update(log: StepLog, best: float | None) -> None:
            nonlocal last_val
            parts = [f"loss {log.loss:.3f}"]
            if log.r_max is not None:
                parts.append(f"r_max {log.r_max:.2f} d_max {log.d_max:.2f}")
            if log.val_dice:
                last_val = "val " + " ".join(f"{k} {v:.3f}" for k, v in log.val_dice.items())
                if log.disparity:
                    last_val += " | disp " + " ".join(f"{v:.3f}" for v in log.disparity.values())
            if last_val:
                parts.append(last_val)
            advance(completed=log.step, info="  ".join(parts))

        yield update
