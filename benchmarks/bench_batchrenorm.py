"""BatchRenorm vs nn.BatchNorm: one U-Net training step and one eval forward, side by side.

Same process, same weights and data, interleaved repeats; the figure is the ratio of median times.
Target (issues 2 and 14): a BatchRenorm training step costs at most 1.05x a BatchNorm one. After export the
network *is* BatchNorm, so eval cost is identical by construction; the eval ratio below measures the
un-exported BatchRenorm layer (same fused kernel, plus an input check).

    python benchmarks/bench_batchrenorm.py            # paper U-Net (depth 2, 32/64/128), 3D 64^3 b2, 2D 256^2 b8
    python benchmarks/bench_batchrenorm.py --quick    # smaller, for a smoke run
"""

from __future__ import annotations

import argparse

import torch
from common import command_line, interleaved, machine, median, write_section

from tilenorm_bmz.models import UNet
from tilenorm_bmz.norm import RenormSchedule


def _step_fn(net: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = net(x)
        loss = torch.nn.functional.mse_loss(out, y)
        loss.backward()
        opt.step()

    return step


def _eval_fn(net: torch.nn.Module, x: torch.Tensor):
    def fwd() -> None:
        with torch.inference_mode():
            net(x)

    return fwd


def run_case(dims: int, batch: int, size: int, features: int, repeats: int, device: str) -> dict[str, float]:
    torch.manual_seed(0)
    nets = {}
    for norm in ("batchnorm", "batchrenorm"):
        torch.manual_seed(0)
        nets[norm] = UNet(dims=dims, in_channels=1, out_channels=2, depth=2, features=features, norm=norm).to(device)
    # BatchRenorm in its clipping phase (r_max=3, d_max=5): the most expensive configuration
    RenormSchedule(warmup_steps=0, ramp_steps=0).apply(nets["batchrenorm"], 0)
    x = torch.randn(batch, 1, *([size] * dims), device=device)
    y = torch.rand(batch, 2, *([size] * dims), device=device)
    train = {k: _step_fn(n.train(), torch.optim.Adam(n.parameters(), 1e-3), x, y) for k, n in nets.items()}
    t_train = interleaved(train, repeats=repeats, warmup=1, device=device)
    evals = {k: _eval_fn(n.eval(), x) for k, n in nets.items()}
    t_eval = interleaved(evals, repeats=repeats, warmup=1, device=device)
    return {
        "bn_train": median(t_train["batchnorm"]),
        "brn_train": median(t_train["batchrenorm"]),
        "bn_eval": median(t_eval["batchnorm"]),
        "brn_eval": median(t_eval["batchrenorm"]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="small sizes (smoke run), not written to BENCHMARKS.md")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size3d", type=int, default=None, help="an extra 3D case, e.g. 192 (the paper's tile) on a GPU")
    args = p.parse_args()
    cases = [(3, 2, 64, 32), (2, 8, 256, 32)]
    if args.size3d:
        cases.append((3, 2, args.size3d, 32))
    if args.quick:
        cases = [(3, 1, 32, 8), (2, 2, 64, 8)]
    rows = []
    for dims, batch, size, feats in cases:
        r = run_case(dims, batch, size, feats, args.repeats, args.device)
        rows.append(
            f"| {dims}D | {batch} | {size}^{dims} | {r['bn_train']*1e3:.0f} | {r['brn_train']*1e3:.0f} | "
            f"{batch / r['bn_train']:.2f} | {batch / r['brn_train']:.2f} | "
            f"**{r['brn_train']/r['bn_train']:.3f}x** | {r['brn_eval']/r['bn_eval']:.3f}x |"
        )
        print(rows[-1], flush=True)
    body = "\n".join(
        [
            "One U-Net training step (forward, MSE loss, backward, Adam step) of the paper's U-Net "
            "(depth 2, 32/64/128 features), BatchRenorm in its clipping phase (r_max=3, d_max=5) vs nn.BatchNorm; "
            f"median of {args.repeats} interleaved repeats after a warm-up. Target: <= 1.05x.",
            "",
            f"Machine: {machine()}. Command: `{command_line()}`",
            "",
            "| dims | batch | tile | BatchNorm step (ms) | BatchRenorm step (ms) | BatchNorm tiles/s | "
            "BatchRenorm tiles/s | train ratio | eval ratio (un-exported) |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            "After `tilenorm-bmz package` every BatchRenorm is an nn.BatchNorm, so exported eval cost is "
            "identical to BatchNorm by construction (tested: outputs bit-identical).",
        ]
    )
    if not args.quick:
        write_section("BatchRenorm vs BatchNorm training step", body)
    print(body)


if __name__ == "__main__":
    main()
