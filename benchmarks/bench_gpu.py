"""Exact tiled prediction throughput on one device: voxels/s at two volume sizes, float32 and autocast.

The paper's 3D U-Net (depth 2, 32 features, BatchRenorm exported as BatchNorm in eval, non-trivial running
statistics), globally normalized volumes, the halo from the receptive field, the tile ``plan_tile`` chooses
for ``--budget-gib`` (measured forward memory + pipeline buffers), batch 1. TiledPredictor's pipeline as
users run it: a reader thread prefetches tiles (pinned host memory on CUDA, copied with ``non_blocking``)
while the device computes, and a writer thread stores finished blocks.

For each size: float32, ``autocast`` bfloat16 and float16 (the BatchNorm parameters and running statistics
stay float32 under autocast; only activations are cast). Reported: voxels/s (image voxels / wall time,
median of ``--repeats`` after a warm-up), the largest |output - float32 output| and the fraction of voxels
whose foreground decision (> 0.5) differs from float32; at the smaller size also max |float32 tiled -
whole-volume forward| (exactness).

    python benchmarks/bench_gpu.py                       # 256^3 and 512^3 on the default device
    python benchmarks/bench_gpu.py --dry                 # 48^3 and 64^3, 4 features: CPU-sized smoke run

Run by ``benchmarks/gpu.sh`` (which also runs the gpu-marked tests and the gate benchmark).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from bench_tiling import make_model, make_volume
from common import BENCHMARKS_MD, command_line, machine, median, sync, write_section

from tilenorm_bmz.config import InputNormalization
from tilenorm_bmz.data import fit_normalization
from tilenorm_bmz.tiling import TiledPredictor, forward_whole, recommend_halo, resolve_device
from tilenorm_bmz.tiling.memory import plan_tile

NORMALIZATION = {"mode": "global", "lower": 0.01, "upper": 0.98}
PRECISIONS = {"float32": None, "autocast bfloat16": "bfloat16", "autocast float16": "float16"}


def run_size(args: argparse.Namespace, model: torch.nn.Module, halo: tuple[int, ...], size: int,
             device: torch.device, exact: bool) -> tuple[list[str], str]:
    raw = make_volume(size, seed=size)
    x = fit_normalization(InputNormalization(**NORMALIZATION), raw).apply(raw)
    del raw
    plan, mem, budget = plan_tile(model, x.shape[1:], halo, device=device, memory_budget_bytes=args.budget)
    rows = []
    reference = None
    for label, dtype in PRECISIONS.items():
        predictor = TiledPredictor(model, plan.tile_shape, halo, device=device, autocast=dtype)
        y = predictor.predict(x)  # warm-up, and the output compared
        times = []
        for _ in range(args.repeats):
            sync(device)
            t0 = time.perf_counter()
            predictor.predict(x)
            sync(device)
            times.append(time.perf_counter() - t0)
        t = median(times)
        if reference is None:
            reference = y
            diff, flips = 0.0, 0.0
        else:
            diff = float(np.abs(y - reference).max())
            flips = float(((y > 0.5) != (reference > 0.5)).mean())
        used = "" if device.type == "cuda" or dtype is None else " (autocast is CUDA-only: ran float32)"
        rows.append(
            f"| {size}^3 | {label}{used} | {'x'.join(map(str, plan.tile_shape))} | {plan.n_tiles} | {t:.2f} | "
            f"**{size**3 / t / 1e6:.1f}** | {diff:.2e} | {flips:.2e} |"
        )
        print(rows[-1], file=sys.stderr)
    note = f"- {size}^3: {plan.describe()}; forward {mem.describe()}; budget {budget / 2**30:.1f} GiB."
    if exact and reference is not None:
        whole = forward_whole(model, x, device=device)
        note += f" Max |float32 tiled - whole-volume forward| = **{float(np.abs(reference - whole).max()):.2e}**."
    return rows, note


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--features", type=int, default=32)
    p.add_argument("--budget-gib", type=float, default=16.0, help="memory budget of the planned tiles")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--dry", action="store_true", help="48^3 and 64^3, 4 features, 1 repeat: a smoke run")
    p.add_argument("--md", type=Path, default=BENCHMARKS_MD, help="Markdown file whose section is (re)written")
    args = p.parse_args()
    if args.dry:
        args.sizes, args.features, args.repeats, args.budget_gib = [48, 64], 4, 1, 0.25
    args.budget = int(args.budget_gib * 2**30)
    device = resolve_device(args.device)
    model = make_model(args.features).to(device)
    halo = recommend_halo(model, 3, device=device)
    t_start = time.perf_counter()
    rows, notes = [], []
    for i, size in enumerate(args.sizes):
        r, note = run_size(args, model, halo, size, device, exact=i == 0)
        rows += r
        notes.append(note)
    body = "\n".join([
        f"Machine: {machine()}. Command: `{command_line()}` ({(time.perf_counter() - t_start) / 60:.1f} min).",
        "",
        f"Random 3D BatchRenorm U-Net (depth 2, features {args.features}), halo {halo[0]}, batch 1, the tile "
        f"planned for a budget of {args.budget_gib:g} GiB; reader thread with pinned-memory prefetch and a writer "
        f"thread overlapping compute; median of {args.repeats} run(s) after a warm-up. Voxels/s = image voxels / "
        "wall time of the whole tiled prediction (reading, transfers, cropping included).",
        "",
        "| volume | precision | tile | tiles | time (s) | Mvoxels/s | max abs diff to float32 | foreground flips vs float32 |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        *notes,
    ])
    write_section(f"Device throughput ({'dry run' if args.dry else device.type})", body, path=args.md)
    print(body)


if __name__ == "__main__":
    main()
