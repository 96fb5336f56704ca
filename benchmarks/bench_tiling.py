"""Tiled prediction: TiledPredictor vs MONAI sliding windows vs bioimage.io.core blocking; overhead;
out-of-core memory; dask workers.

Same process, same random 3D BatchRenorm U-Net (eval, non-trivial running statistics), same volume,
interleaved repeats, ratios of median times. ``max |x - whole|`` is against one forward pass of the
whole (globally normalized, zero-padded-to-the-divisor) volume.

    python benchmarks/bench_tiling.py                 # CPU: 128^3, 192^3, 256^3, features 16, budget 1 GiB
    python benchmarks/bench_tiling.py --only ooc      # one section (written to BENCHMARKS.md on its own)
    python benchmarks/bench_tiling.py --sizes 256 512 --features 32 --budget-gib 16 --repeats 3   # a GPU
    python benchmarks/bench_tiling.py --quick         # smoke run (prints, writes nothing)

Sections (each its own ``##`` section of BENCHMARKS.md):

1. **Methods and overhead**: at each size, TiledPredictor with the tile ``plan_tile`` chooses for the memory
   budget (the cheapest plan) vs MONAI ``sliding_window_inference`` (roi 96, overlap 0.25, constant
   blending) vs bioimage.io.core's blocked prediction of the exported package, against one forward pass
   of the whole volume (time and exactness); the plan's voxels processed vs the measured time ratio.
2. **Out of core**: a fresh process predicts a uint8 Zarr volume into a 2-channel float32 Zarr output
   (``predict_file`` with the budget); peak RSS growth and time per voxel, against the in-memory path. A
   cheap network (depth 1, 2 features) keeps 640^3 CPU-friendly.
3. **dask**: the same blocks on a local cluster of 1 and of 2 worker processes (1 thread each) vs the
   single process.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from common import command_line, interleaved, machine, median, write_section

from tilenorm_bmz.checkpoint import load_checkpoint, save_checkpoint
from tilenorm_bmz.config import InputNormalization
from tilenorm_bmz.data import fit_normalization
from tilenorm_bmz.models import UNet
from tilenorm_bmz.tiling import TiledPredictor, forward_whole, predict_dask, recommend_halo
from tilenorm_bmz.tiling.inference import prepare_for_inference
from tilenorm_bmz.tiling.memory import plan_tile

NORMALIZATION = {"mode": "global", "lower": 0.01, "upper": 0.98}


def make_model(features: int, seed: int = 0, depth: int = 2) -> UNet:
    """A random 3D BatchRenorm U-Net in eval mode with non-trivial running statistics."""
    torch.manual_seed(seed)
    net = UNet(dims=3, in_channels=1, out_channels=2, depth=depth, features=features, norm="batchrenorm")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.1)
    return net.eval()


def make_volume(size: int, seed: int = 0) -> np.ndarray:
    """A raw-looking volume (1, size, size, size): gamma noise plus bright blobs."""
    rng = np.random.default_rng(seed)
    x = rng.gamma(2.0, 100.0, (size, size, size)).astype(np.float32)
    grid = np.indices((size, size, size), dtype=np.float32)
    for _ in range(max(4, size // 16)):
        c = rng.uniform(0, size, 3)
        r2 = sum((g - ci) ** 2 for g, ci in zip(grid, c, strict=True))
        x[r2 < (size / 16) ** 2] += 800.0
    return x[None]


# -- 1 + 2: methods and overhead -----------------------------------------------------------------------
def monai_fn(model: torch.nn.Module, x: np.ndarray, tile: int, overlap: float):
    from monai.inferers import sliding_window_inference

    t = torch.from_numpy(x)[None]

    def run() -> np.ndarray:
        with torch.inference_mode():
            y = sliding_window_inference(t, (tile,) * 3, 1, model, overlap=overlap, mode="constant")
        return y[0].numpy()

    return run


def bmz_fn(package: Path, raw: np.ndarray, tile: int):
    """bioimage.io.core's blocked prediction of the package (its own preprocessing, blocks of ``tile``)."""
    import yaml
    from bioimageio.core import create_prediction_pipeline, load_model_description, predict
    from bioimageio.spec.model.v0_5 import AxisId, TensorId

    rdf = yaml.safe_load(zipfile.ZipFile(package).read("rdf.yaml"))
    in_id, out_id = TensorId(rdf["inputs"][0]["id"]), TensorId(rdf["outputs"][0]["id"])
    pipeline = create_prediction_pipeline(load_model_description(package))
    block = {in_id: {AxisId(a): tile for a in "zyx"}}

    def run() -> np.ndarray:
        sample = predict(model=pipeline, inputs={in_id: raw[None]}, input_block_shape=block)
        return np.asarray(sample.members[out_id].data)[0]

    return run


def bench_methods_at(args: argparse.Namespace, model: torch.nn.Module, halo: tuple[int, ...], size: int,
                     package: Path | None) -> tuple[list[str], str]:
    """Rows of the methods table at one volume size, and the tiling line."""
    raw = make_volume(size, seed=size)
    fitted = fit_normalization(InputNormalization(**NORMALIZATION), raw)
    x = fitted.apply(raw)
    as_given = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    # plan_tile prepares the network for inference (:mod:`tilenorm_bmz.tiling.inference`): its convolution
    # weights become channels-last in place, so MONAI and the whole forward below run that layout too
    plan, mem, budget = plan_tile(model, x.shape[1:], halo, device="cpu", memory_budget_bytes=args.budget)
    predictor = TiledPredictor(model, plan.tile_shape, halo, device="cpu")
    tiling = predictor.tiling(x.shape[1:])
    roi = args.monai_roi
    fns = {
        "whole volume (one forward)": lambda: forward_whole(model, x, device="cpu"),
        "whole volume, network as given (no rewrites)": lambda: forward_whole(as_given, x, device="cpu",
                                                                             optimize=False),
        "TiledPredictor (planned tile)": lambda: predictor.predict(x),
        f"MONAI roi {roi}, overlap 0.25": monai_fn(model, x, roi, 0.25),
    }
    if package is not None:
        fns[f"bioimage.io.core blocked, block {max(plan.tile_shape)}"] = bmz_fn(package, raw, max(plan.tile_shape))

    def windows(interval: int) -> int:  # MONAI: ceil((size - roi) / interval) + 1 windows per axis
        return (1 if size <= roi else -(-(size - roi) // interval) + 1) ** 3

    passes = [1, 1, len(tiling), windows(int(roi * 0.75)), -(-size // (max(plan.tile_shape) - 2 * halo[0])) ** 3]
    outputs = {name: fn() for name, fn in fns.items()}  # warm-up and the outputs to compare
    whole = outputs["whole volume (one forward)"]
    times = interleaved(fns, repeats=args.repeats, warmup=0)
    t_tiled = median(times["TiledPredictor (planned tile)"])
    t_whole = median(times["whole volume (one forward)"])
    rows = []
    for (name, out), n in zip(outputs.items(), passes, strict=False):
        t = median(times[name])
        err = float(np.abs(out - whole).max())
        rows.append(f"| {size}^3 | {name} | {n} | {t:.2f} | {t / t_whole:.2f}x | {t / t_tiled:.2f}x | {err:.2e} |")
    line = (
        f"- {size}^3: {plan.describe()}; forward {mem.describe()}; budget {budget / 2**30:.2f} GiB. "
        f"Tiled / whole = **{t_tiled / t_whole:.2f}x** (voxels processed: {tiling.overhead:.2f}x), "
        f"tiled / MONAI = **{t_tiled / median(times[f'MONAI roi {roi}, overlap 0.25']):.2f}x**; tiled / "
        f"whole forward of the network as given = "
        f"{t_tiled / median(times['whole volume, network as given (no rewrites)']):.2f}x."
    )
    return rows, line


def bench_methods(args: argparse.Namespace, workdir: Path) -> str:
    model = make_model(args.features)
    halo = recommend_halo(model, 3)
    package = None
    if not args.skip_bmz:
        try:
            from tilenorm_bmz.bmz import export_package
            from tilenorm_bmz.config import ExportConfig
        except ImportError as e:  # pragma: no cover - bmz extra missing
            print(f"skipping bioimage.io.core: {e}", file=sys.stderr)
        else:
            ckpt = save_checkpoint(workdir / "bench.pt", model, input_normalization=NORMALIZATION)
            t0 = time.perf_counter()
            package = export_package(
                ckpt, workdir / "bench.zip", export_config=ExportConfig(authors=[{"name": "benchmark"}]),
                sample=make_volume(64)[0],
            ).package
            print(f"exported the package in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    rows, lines = [], []
    for size in args.sizes:
        r, line = bench_methods_at(args, model, halo, size, package)
        rows += r
        lines.append(line)
        print(line, file=sys.stderr)
    body = [
        f"Random 3D BatchRenorm U-Net (depth 2, features {args.features}, exported form: BatchNorm in eval), "
        f"volume 1 channel globally normalized, halo {halo[0]} (the one-sided receptive field, rounded); "
        f"TiledPredictor's tile chosen by `plan_tile` for a memory budget of {args.budget / 2**30:.2f} GiB "
        "(measured forward memory + pipeline buffers, the cheapest plan). The network runs as "
        "`prepare_for_inference` prepares it (skip concatenations split out of the decoder convolutions, "
        "channels-last convolution weights); TiledPredictor, the whole forward and MONAI all run that "
        "preparation's weight layout (converted in place), the row 'network as given' is one forward of an "
        "unprepared copy (default layout, concatenations). MONAI `sliding_window_inference` with "
        f"roi {args.monai_roi}, overlap 0.25, constant blending; bioimage.io.core's blocked prediction of the exported "
        "package with blocks of the planned tile's largest side. Batch 1, same threads, "
        f"median of {args.repeats} interleaved repeat(s) after a warm-up run that also gives the outputs.",
        "",
        "| volume | method | forward passes | time (s) | time / whole | time / TiledPredictor | max abs diff to whole |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        *lines,
    ]
    if package is None:
        body += ["", "bioimage.io.core: not run (`--skip-bmz`)."]
    return "\n".join(body)


def bench_plan(args: argparse.Namespace, workdir: Path) -> str:
    """Voxels processed (not timed) by the cheapest exact plan vs MONAI's windows, over volume sizes."""
    from tilenorm_bmz.tiling.memory import measure_forward_memory, pipeline_bytes_per_voxel
    from tilenorm_bmz.tiling.plan import plan_tiles

    model = make_model(args.features)
    halo = recommend_halo(model, 3)
    prepared = prepare_for_inference(model, 3, 1, model.divisor, torch.device("cpu")).module
    mem = measure_forward_memory(prepared, 3, device="cpu", budget=args.budget)
    limit = args.budget / (mem.bytes_per_voxel + pipeline_bytes_per_voxel(1, mem.out_channels))
    roi, interval = args.monai_roi, int(args.monai_roi * 0.75)
    rows = []
    for size in range(128, 385, 32):
        plan = plan_tiles((size,) * 3, halo, model.divisor, limit)
        n = 1 if size <= roi else -(-(size - roi) // interval) + 1
        monai = (n * roi / size) ** 3
        rows.append(f"| {size}^3 | {'x'.join(map(str, plan.grid))} of {'x'.join(map(str, plan.tile_shape))} | "
                    f"{plan.overhead:.2f}x | {n}^3 of {roi}^3 | {monai:.2f}x | {plan.overhead / monai:.2f} |")
    return "\n".join([
        f"The plan `plan_tile` makes for the same network (forward {mem.describe()}; budget "
        f"{args.budget / 2**30:.2f} GiB; halo {halo[0]}) vs MONAI's windows (roi {roi}, overlap 0.25: "
        f"interval {interval}): voxels processed / image voxels, computed from the geometry, not timed (time "
        "per voxel is constant, so the time ratio follows; see the measured table above). MONAI's windows "
        f"overlap by {roi - interval} voxels, less than the 2 x {halo[0]} an exact stitch needs, so where its "
        "windows happen to fit the volume snugly it processes fewer voxels, and its output differs from the "
        "whole-volume forward (the max abs diff column above).",
        "",
        "| volume | exact plan | voxels processed | MONAI windows | MONAI voxels processed | plan / MONAI |",
        "|---|---|---|---|---|---|",
        *rows,
    ])


# -- 3: out of core -------------------------------------------------------------------------------------
def _rss(field: str) -> int | None:
    """``VmRSS`` / ``VmHWM`` of this process in bytes (Linux), or None."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the peak-RSS mark (Linux ``clear_refs`` 5) so it measures only what follows."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def ooc_child(args: argparse.Namespace) -> None:
    """Run in a fresh process: predict a Zarr volume (into Zarr or .npy); print time and peak RSS as JSON."""
    from tilenorm_bmz.data.io import open_image
    from tilenorm_bmz.tiling import predict_file

    torch.set_num_threads(args.threads)
    model, info = load_checkpoint(args.ooc_checkpoint)
    before = _rss("VmRSS") or 0
    # 1. the global normalization, fitted once (from a bounded sample of blocks for large volumes)
    reset = _reset_peak_rss()
    settings = InputNormalization.model_validate(info.extra["input_normalization"])
    fitted = fit_normalization(settings, open_image(args.ooc_input))
    fit_peak = _rss("VmHWM") if reset else None
    # 2. the tiled prediction with those statistics (mode "fixed" applies exactly the fitted lo/hi), the
    #    tile planned for the budget (its probes run here too: part of the measured peak)
    fixed = settings.model_copy(update={"mode": "fixed", "low": list(fitted.lo), "high": list(fitted.hi)})
    before_predict = _rss("VmRSS") or 0
    reset = _reset_peak_rss()
    t0 = time.perf_counter()
    summary = predict_file(
        model, args.ooc_input, args.ooc_output, device="cpu", normalization=fixed, memory_budget=args.budget,
    )
    seconds = time.perf_counter() - t0
    peak = _rss("VmHWM") if reset else None
    if peak is None:  # no /proc: the lifetime peak (imports included)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux, BSD: kB
    out = {
        "seconds": seconds, "peak_rss": peak, "before": before, "before_predict": before_predict,
        "fit_peak": fit_peak, "blocks": summary.n_blocks, "halo": summary.halo[0], "estimated": fitted.estimated,
        "tile": summary.tile_shape, "overhead": summary.overhead, "plan": summary.plan,
    }
    print(json.dumps(out))


def write_zarr(path: Path, size: int, seed: int) -> None:
    """A raw-looking uint8 Zarr volume, written slab by slab (the parent never holds it either)."""
    import zarr

    z = zarr.open_array(str(path), mode="w", shape=(1, size, size, size), chunks=(1, 64, 64, 64), dtype="uint8")
    rng = np.random.default_rng(seed)
    for k in range(0, size, 64):
        slab = rng.gamma(2.0, 20.0, (1, min(64, size - k), size, size))
        z[:, k : k + 64] = np.clip(slab, 0, 255).astype(np.uint8)


def bench_out_of_core(args: argparse.Namespace, workdir: Path) -> str:
    model = make_model(args.ooc_features, seed=1, depth=args.ooc_depth)
    ckpt = save_checkpoint(workdir / "ooc.pt", model, input_normalization=NORMALIZATION)
    rows, ratios = [], []
    halo = None
    mib = 2**20
    for size in args.ooc_sizes:
        inp = workdir / f"in{size}.zarr"
        write_zarr(inp, size, seed=size)
        per_voxel = {}
        for kind, suffix in (("Zarr (out of core)", ".zarr"), ("in memory (.npy)", ".npy")):
            out = workdir / f"out{size}{suffix}"
            cmd = [
                sys.executable, __file__, "--ooc-child", "--ooc-checkpoint", str(ckpt), "--ooc-input", str(inp),
                "--ooc-output", str(out), "--budget-gib", str(args.budget / 2**30), "--threads", str(args.threads),
            ]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            info = json.loads(res.stdout.strip().splitlines()[-1])
            halo = info["halo"]
            io_mib = size**3 * (1 + 2 * 4) / mib  # uint8 input + 2-channel float32 output
            fit = "-" if info["fit_peak"] is None else f"{(info['fit_peak'] - info['before']) / mib:.0f}"
            per_voxel[kind] = info["seconds"] / size**3
            growth = (info["peak_rss"] - info["before_predict"]) / mib
            rows.append(
                f"| {size}^3 | {kind} | {io_mib:.0f} | {io_mib * mib / args.budget:.1f}x | "
                f"{'x'.join(map(str, info['tile']))} | {info['blocks']} | {info['overhead']:.2f}x | "
                f"{fit}{' (sampled)' if info['estimated'] else ''} | {info['before_predict'] / mib:.0f} | "
                f"**{growth:.0f}** | {info['seconds']:.1f} | {per_voxel[kind] * 1e9:.0f} |"
            )
            print(rows[-1], info["plan"], file=sys.stderr)
            if out.suffix == ".npy":
                out.unlink()
            else:
                shutil.rmtree(out)
        shutil.rmtree(inp)
        ratios.append(
            f"{size}^3: **{per_voxel['Zarr (out of core)'] / per_voxel['in memory (.npy)']:.2f}x**"
        )
    return "\n".join([
        f"`predict_file` of a uint8 Zarr volume into a 2-channel float32 output, in a fresh process per run "
        f"(random 3D BatchRenorm U-Net, depth {args.ooc_depth}, features {args.ooc_features}, halo {halo} from "
        f"its receptive field; the tile planned for a budget of {args.budget / 2**30:.2f} GiB; global "
        "normalization, estimated from a seeded sample of blocks when the volume has more than 2^24 voxels). "
        "The in-memory rows write the same prediction to .npy (whole output in memory), for contrast.",
        "",
        "Fitting the normalization is measured on its own: its memory growth is bounded by the sample, not the "
        "volume. Then the prediction runs with those statistics: RSS before = after imports, model and fit; "
        "growth = the peak RSS while predicting (Linux `VmHWM`, reset just before, the tile plan's probes "
        "included) - before. Out of core, the growth must stay below the budget whatever the volume; in memory "
        "it grows with the output.",
        "",
        "| volume | output | input + output (MiB) | data / budget | tile | blocks | voxels processed | normalization "
        "fit growth (MiB) | RSS before (MiB) | peak RSS growth (MiB) | time (s) | ns / voxel |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Time per voxel, out of core / in memory: " + ", ".join(ratios) + ".",
    ])


# -- 4: dask --------------------------------------------------------------------------------------------
def bench_dask(args: argparse.Namespace, workdir: Path) -> str:
    import distributed
    import zarr

    from tilenorm_bmz.data.io import create_output, open_image
    from tilenorm_bmz.tiling import max_inner_size

    model = make_model(args.ooc_features, seed=2, depth=args.ooc_depth)
    halo = recommend_halo(model, 3)
    size, tile = args.dask_size, args.ooc_tile
    inp = workdir / "dask_in.zarr"
    write_zarr(inp, size, seed=3)
    image = open_image(inp)
    predictor = TiledPredictor(model, (tile,) * 3, halo, device="cpu")
    inner = max_inner_size(tile, halo[0], predictor.divisor[0])
    chunks = (2, inner, inner, inner)
    counter = iter(range(10**6))
    written: dict[str, Path] = {}

    def single() -> None:
        written["single"] = workdir / f"single{next(counter)}.zarr"
        with create_output(written["single"], (2, size, size, size), chunks=chunks) as out:
            predictor.predict_to(image, out)

    clients = {
        n: distributed.Client(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None)
        for n in (1, 2)
    }
    load = os.getloadavg()[0]
    try:

        def on(n: int):
            def run() -> None:
                path = written[f"dask{n}"] = workdir / f"dask{n}_{next(counter)}.zarr"
                with create_output(path, (2, size, size, size), chunks=chunks, check_alignment=True) as out:
                    predict_dask(predictor, image, out, client=clients[n], blocks_per_task=1)

            return run

        fns = {
            f"single process ({args.threads} torch threads)": single,
            "dask, 1 worker process (1 thread)": on(1),
            "dask, 2 worker processes (1 thread each)": on(2),
        }
        times = interleaved(fns, repeats=args.repeats, warmup=1)
    finally:
        for c in clients.values():
            c.close()
    identical = np.array_equal(
        zarr.open_array(str(written["dask2"]))[:], zarr.open_array(str(written["single"]))[:]
    )
    t1 = median(times["dask, 1 worker process (1 thread)"])
    rows = [f"| {name} | {median(t):.2f} | {t1 / median(t):.2f}x |" for name, t in times.items()]
    n_blocks = len(predictor.tiling((size,) * 3, chunks[1:]))
    return "\n".join([
        f"Zarr {size}^3 -> Zarr, same network as above, tile {tile}^3, halo {halo[0]}, {n_blocks} blocks, one "
        f"block per task; clusters started beforehand (start-up not timed); median of {args.repeats} "
        "interleaved repeats after a warm-up.",
        "",
        "| run | time (s) | speed-up vs 1 worker |",
        "|---|---|---|",
        *rows,
        "",
        f"2-worker output identical to the single-process output: **{identical}**.",
        *(
            [
                "",
                f"No speed-up from the second worker here (the 1-min load average was {load:.1f} on "
                f"{os.cpu_count()} cores when this section started, partly this benchmark's own earlier "
                "sections): a second worker needs an idle core; run it on an idle machine.",
            ]
            if t1 / median(times["dask, 2 worker processes (1 thread each)"]) < 1.3
            else []
        ),
    ])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 192, 256], help="volume sides (methods)")
    p.add_argument("--budget-gib", type=float, default=1.0, help="memory budget of the planned tiles")
    p.add_argument("--monai-roi", type=int, default=96, help="MONAI's window side")
    p.add_argument("--features", type=int, default=16, help="U-Net features of the first level (paper: 32)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--skip-bmz", action="store_true", help="skip the bioimage.io.core column")
    p.add_argument("--ooc-sizes", type=int, nargs="+", default=[256, 640], help="out-of-core volume sides")
    p.add_argument("--ooc-tile", type=int, default=128, help="tile of the dask runs")
    p.add_argument("--ooc-depth", type=int, default=1, help="U-Net depth of the out-of-core and dask runs")
    p.add_argument("--ooc-features", type=int, default=2, help="U-Net features of the out-of-core and dask runs")
    p.add_argument("--dask-size", type=int, default=192)
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run (not for BENCHMARKS.md)")
    p.add_argument("--no-write", action="store_true", help="print instead of writing BENCHMARKS.md")
    p.add_argument("--only", choices=["methods", "plan", "ooc", "dask"], help="run (and write) one section")
    # internal: the out-of-core child process
    p.add_argument("--ooc-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ooc-checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--ooc-input", help=argparse.SUPPRESS)
    p.add_argument("--ooc-output", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.budget = int(args.budget_gib * 2**30)
    if args.ooc_child:
        ooc_child(args)
        return
    if args.quick:
        args.sizes, args.features, args.repeats, args.monai_roi = [64], 4, 1, 48
        args.ooc_sizes, args.ooc_tile, args.dask_size = [64, 96], 64, 96
        args.budget = 256 * 2**20
        args.skip_bmz, args.no_write = True, True
    torch.set_num_threads(args.threads)
    titles = {
        "methods": "Tiled prediction: methods and overhead",
        "plan": "Tiled prediction: the plan vs MONAI's windows",
        "ooc": "Tiled prediction: out of core",
        "dask": "Tiled prediction: dask.distributed",
    }
    with tempfile.TemporaryDirectory(prefix="bench_tiling_") as tmp:
        workdir = Path(tmp)
        sections = (("methods", bench_methods), ("plan", bench_plan), ("ooc", bench_out_of_core),
                    ("dask", bench_dask))
        for name, fn in sections:
            if args.only not in (None, name):
                continue
            load_before, t_start = os.getloadavg()[0], time.perf_counter()
            text = fn(args, workdir)
            minutes = (time.perf_counter() - t_start) / 60
            body = "\n".join([
                f"Machine: {machine()}. Command: `{command_line()}` ({minutes:.0f} min for this section; 1-min "
                f"load average {load_before:.1f} before it"
                + (": other processes shared the cores)." if load_before > 0.5 else ", an idle machine)."),
                "",
                text,
            ])
            if args.no_write:
                print(body)
            else:
                write_section(titles[name], body)
                print(f"wrote the '{titles[name]}' section of BENCHMARKS.md", file=sys.stderr)


if __name__ == "__main__":
    main()
