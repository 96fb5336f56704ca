"""``tilenorm-bmz demo``: the whole path on the real data embedded in the package, in a few minutes on a CPU.

1. train a small 2D BatchRenorm U-Net on the DSB2018 nuclei image (held-out region split off 70/30);
2. package it as a bioimage.io model (bioimage.io tests + the gate run before the package is final);
3. validate the package on the held-out region with its labels (JSON + HTML report);
4. predict the whole image tile by tile and check it equals the whole-image forward (seamless);
5. the analyst's path: the package predicts "your" image, the same nuclei recorded as 16 bits in another range
   (values about 33,000-37,000, as from another microscope), as it does the 8-bit one (its percentile
   preprocessing adapts to the image); then ``refit`` writes the ilastik-ready variant for that dataset (fixed
   values fitted on it, so ilastik's per-tile preprocessing cannot seam), re-tested and gated with ilastik.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import DataConfig, ExportConfig, GateConfig, RenormSchedule, TrainConfig, UNetConfig

__all__ = ["DemoResult", "demo_config", "run_demo"]

logger = logging.getLogger(__name__)

#: What the demo writes into its folder (and removes there before a new run; nothing else is touched).
DEMO_ARTIFACTS = ("train", "nuclei2d-demo.bioimageio.zip", "report", "prediction.tif", "your_image_16bit.tif",
                  "your_prediction.tif", "nuclei2d-demo-ilastik.bioimageio.zip", "nuclei2d-demo-ilastik.bioimageio.gate")


@dataclass
class DemoResult:
    out_dir: Path
    checkpoint: Path
    package: Path
    report_html: Path | None
    report_json: Path | None
    prediction: Path
    accepted: bool
    val_dice: dict[str, float]
    tiled_vs_whole: float
    halo: tuple[int, ...]
    your_image: Path | None = None
    """The 16-bit copy of the image ("your" data from another microscope)."""
    foreground: tuple[float, float] | None = None
    """Fraction of the image the package marks foreground on the 8-bit image and on the 16-bit copy."""
    ilastik_package: Path | None = None
    """The variant with fixed preprocessing fitted on the 16-bit copy (None when its gate rejected it)."""
    ilastik_seams: float | None = None
    """Seams of that variant in the ilastik emulation (``max |tiled - whole|``)."""
    seconds: dict[str, float] = field(default_factory=dict)


def demo_config(steps: int = 300, device: str = "auto") -> TrainConfig:
    """The demo's training: a small 2D BatchRenorm U-Net on the embedded nuclei image.

    To fit a few minutes, the running statistics use momentum 0.05 (they settle within ~100 steps; the
    paper's 0.01 needs ~500), with the plain-BatchNorm warm-up on the first 40% of the steps.
    """
    warmup = max(1, int(0.4 * steps))
    return TrainConfig(
        model=UNetConfig(dims=2, depth=2, features=16, norm={"kind": "batchrenorm", "momentum": 0.05}),
        data=DataConfig(sample="nuclei2d", tile_shape=(128, 128), min_foreground=0.05),
        schedule=RenormSchedule(warmup_steps=warmup, ramp_steps=max(1, int(0.3 * steps))),
        steps=steps,
        batch_size=4,
        grad_accumulation=1,
        lr=2e-3,
        validate_every=steps,
        checkpoint_every=steps,
        disparity_tiles=4,
        device=device,  # type: ignore[arg-type]
    )


def _clean(out: Path) -> None:
    for name in DEMO_ARTIFACTS:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def run_demo(
    out_dir: str | os.PathLike[str] = "demo_output",
    *,
    steps: int = 300,
    device: str = "auto",
    progress: bool = False,
) -> DemoResult:
    """Run the demo; see the module docstring. Re-running replaces the demo's own artifacts in ``out_dir``."""
    from .bmz import export_package, gate_hook, validate_package
    from .checkpoint import load_checkpoint
    from .data import write_tiff
    from .tiling import TiledPredictor
    from .tiling.predictor import forward_whole
    from .train import Trainer
    from .zoo import gate_data

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clean(out)
    times: dict[str, float] = {}
    cfg = demo_config(steps, device)

    t0 = time.perf_counter()
    trainer = Trainer(cfg, out / "train", progress=progress)
    result = trainer.fit()
    times["train"] = time.perf_counter() - t0
    last = result.last_validation
    val_dice = dict(last.val_dice) if last is not None else {}

    image, labels, name = gate_data(cfg, out)
    gate_cfg = GateConfig()
    export_cfg = ExportConfig(
        name="tilenorm-bmz demo nuclei 2D BatchRenorm",
        description=(
            "Demo 2D BatchRenorm U-Net for nuclei (foreground and boundary probabilities), trained for a few "
            "minutes on the DSB2018 image embedded in tilenorm-bmz. For trying the tools, not for analysis."
        ),
        authors=[{"name": "tilenorm-bmz demo"}],
    )
    package = out / "nuclei2d-demo.bioimageio.zip"
    t0 = time.perf_counter()
    exported = export_package(result.last, package, export_config=export_cfg, sample=image,
                              gate=gate_hook(gate_cfg, data=image, labels=labels, name=name), progress=progress)
    times["package"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    report = validate_package(package, image, labels, config=gate_cfg, out_dir=out / "report", name=name,
                              progress=progress)
    times["validate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    model, info = load_checkpoint(result.last)
    from .data import InputNormalization, fit_normalization, load_sample

    full, _ = load_sample("nuclei2d")
    norm = fit_normalization(InputNormalization.model_validate(info.extra["input_normalization"]), full)
    x = norm.apply(full)
    halo = tuple(int(h) for h in exported.halo.values())
    tiled = TiledPredictor(model, (128, 128), halo, batch_size=4, device=device).predict(x)
    whole = forward_whole(model, x, device=device)
    diff = float(np.abs(tiled - whole).max())
    prediction = write_tiff(out / "prediction.tif", tiled.astype(np.float32), axes="CYX", overwrite=True)
    times["predict"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    analyst = _analyst_path(package, full, out, device, progress)
    times["analyst"] = time.perf_counter() - t0
    return DemoResult(
        out_dir=out,
        checkpoint=result.last,
        package=package,
        report_html=report.report_html,
        report_json=report.report_json,
        prediction=Path(prediction),
        accepted=report.accepted,
        val_dice=val_dice,
        tiled_vs_whole=diff,
        halo=halo,
        seconds=times,
        **analyst,
    )


def _analyst_path(package: Path, image: np.ndarray, out: Path, device: str, progress: bool) -> dict[str, object]:
    """Step 5 of the module docstring: the package on a 16-bit copy of ``image``, then its ilastik-ready variant."""
    from .bmz.opening import open_model
    from .bmz.refit import refit_package
    from .data import open_image, write_tiff
    from .tiling import predict_file

    span = float(image.max() - image.min()) or 1.0
    own = np.rint(33000 + (image.astype(np.float64) - float(image.min())) / span * 4000).astype(np.uint16)
    own_path = Path(write_tiff(out / "your_image_16bit.tif", own, axes="CYX", overwrite=True))
    handle = open_model(package)  # as `tilenorm-bmz predict PACKAGE IMAGE` opens it
    settings, _ = handle.normalization_for("model")
    fractions = []
    with tempfile.TemporaryDirectory() as tmp:
        eight_bit = Path(write_tiff(Path(tmp) / "image_8bit.tif", image, axes="CYX"))  # for comparison only
        for source, result in ((eight_bit, Path(tmp) / "prediction_8bit.tif"), (own_path, out / "your_prediction.tif")):
            predict_file(handle.network, source, result, normalization=settings, divisor=handle.divisor,
                         device=device, overwrite=True)
            fractions.append(float((np.asarray(open_image(result).read())[0] > 0.5).mean()))
    refit = refit_package(package, [own_path], out / "nuclei2d-demo-ilastik.bioimageio.zip", overwrite=True,
                          progress=progress)
    seams = None
    if refit.gate is not None:
        seams = next((c.max_abs_diff for c in refit.gate.consumers if c.consumer == "ilastik"), None)
    return {"your_image": own_path, "foreground": (fractions[0], fractions[1]), "ilastik_package": refit.package,
            "ilastik_seams": seams}
