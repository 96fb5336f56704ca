"""Write the independent 2D nuclei images of model_zoo/ from mnfinder 1.2.3's test data (run once, offline).

    pip download --no-deps mnfinder==1.2.3 && unzip -q mnfinder-1.2.3-py3-none-any.whl 'mnfinder/test-data/*'
    python make_labels.py mnfinder/test-data

Images are copied pixel for pixel. Each nucleus mask (an RGBA PNG with one solid colour per nucleus and alpha
0 outside) becomes uint16 instance labels: one id per colour, every face-connected piece of a colour its own
id, pieces under 8 pixels dropped, ids 1..N in the order of the colours' RGB codes.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import tifffile
from skimage.io import imread
from skimage.measure import label as connected

#: name here -> (folder in test-data, image file stem)
IMAGES = {
    "u2os-wf20x": ("2022-10-14_U2OS", "4"),
    "mcc13-sd40x": ("2023-05-31_misc", "MCC13_rfpcyto_w1cDAPI_s43"),
    "hff-sd40x": ("2023-05-31_misc", "HFF-revt-01_s18"),
    "hela-spe40x": ("2023-05-31_misc", "MAX_2021_3_25_hela_misseg_dcas9_1_chr1XCE568_DAPI_40x-0002"),
    "rpe1-spe40x": ("2023-05-31_misc", "MAX_2022-12-29-0004"),
}
KW = {"compression": "zlib", "compressionargs": {"level": 9}, "photometric": "minisblack", "metadata": {"axes": "YX"}}


def colour_labels(mask: np.ndarray, min_size: int = 8) -> np.ndarray:
    rgb = mask[..., :3].astype(np.uint32)
    code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    if mask.shape[-1] == 4:
        code[mask[..., 3] == 0] = 0
    labels = np.zeros(code.shape, np.uint16)
    n = 0
    for c in np.unique(code):
        if c == 0:
            continue
        pieces = connected(code == c, connectivity=1)
        for k in range(1, int(pieces.max()) + 1):
            piece = pieces == k
            if piece.sum() >= min_size:
                n += 1
                labels[piece] = n
    return labels


def main(test_data: Path, out: Path) -> None:
    for name, (folder, stem) in IMAGES.items():
        image_path = test_data / folder / "images" / f"{stem}.tif"
        mask_path = test_data / folder / "nucleus_masks" / f"{stem}.png"
        image = tifffile.imread(image_path)
        labels = colour_labels(imread(mask_path))
        tifffile.imwrite(out / f"{name}_image.tif", image, **KW)
        tifffile.imwrite(out / f"{name}_labels.tif", labels, **KW)
        for p in (image_path, mask_path):
            print(hashlib.sha256(p.read_bytes()).hexdigest(), f"{folder}/{p.parent.name}/{p.name}")
        print(f"  -> {name}: {image.shape} {image.dtype} {image.min()}..{image.max()}, {labels.max()} nuclei")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(__file__).resolve().parent)
