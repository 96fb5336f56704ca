"""Regenerate the figures of the README: ``python docs/make_figures.py``."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from tilenorm_bmz.data import instances_to_targets, load_sample

HERE = Path(__file__).resolve().parent


def labels_to_targets(path: Path = HERE / "labels_to_targets.png") -> Path:
    image, labels = load_sample("nuclei2d")
    sl = (slice(150, 278), slice(200, 328))
    crop_img, crop_lab = image[0][sl], labels[sl]
    targets = instances_to_targets(crop_lab, boundary_width=1)
    rng = np.random.default_rng(3)
    colors = rng.uniform(0.2, 1.0, size=(int(crop_lab.max()) + 1, 3))
    colors[0] = 0
    panels = [
        (crop_img, "image", "gray"),
        (colors[crop_lab], "instance labels", None),
        (targets[0], "target 0: foreground\n(object minus boundary)", "gray"),
        (targets[1], "target 1: boundary\n(inner, 1 px; separates touching)", "gray"),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.7), constrained_layout=True)
    for ax, (arr, title, cmap) in zip(axes, panels, strict=True):
        ax.imshow(arr, cmap=cmap, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


if __name__ == "__main__":
    print(labels_to_targets())
