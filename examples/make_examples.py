"""Regenerate the example PNGs in examples/ from the shipped MNIST test set.

    python examples/make_examples.py            # rewrites examples/*.png
    python examples/make_examples.py --dest DIR

The first two 3s and the first two 7s of `training/data/t10k-*` (the official MNIST test
set's 3s and 7s, in their original order), as dark ink on white and enlarged 4x with
nearest-neighbour resampling, so each PNG holds exactly the MNIST pixels. Deterministic:
the same data gives the same pixels (tests/unit/test_examples.py checks it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = REPO_ROOT / "examples"
DATA = REPO_ROOT / "training" / "data"
SCALE = 4
# name -> (index in the shipped t10k files, index in MNIST's 10,000-image test set, digit)
EXAMPLE_INDICES = {
    "three-1": (2, 18, 3),
    "three-2": (4, 30, 3),
    "seven-1": (0, 0, 7),
    "seven-2": (1, 17, 7),
}


def example_digits() -> dict[str, tuple[np.ndarray, int]]:
    """name -> (the MNIST image, uint8 [28, 28], light ink on black; its label)."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from serving.idx import read_images, read_labels

    images = read_images(DATA / "t10k-images-idx3-ubyte.gz")
    labels = read_labels(DATA / "t10k-labels-idx1-ubyte.gz")
    digits = {}
    for name, (index, _, digit) in EXAMPLE_INDICES.items():
        if int(labels[index]) != digit:
            raise ValueError(f"{name}: shipped test image {index} is a {labels[index]}")
        digits[name] = (np.asarray(images[index], dtype=np.uint8), digit)
    return digits


def example_image(image: np.ndarray) -> Image.Image:
    """An MNIST image as the example PNG shows it: dark ink on white, 4x larger."""
    side = image.shape[0] * SCALE
    return Image.fromarray(255 - image, "L").resize((side, side), Image.Resampling.NEAREST)


def write_examples(dest: Path = EXAMPLES) -> list[Path]:
    """Writes `<name>.png` for every example into `dest`; returns the paths."""
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (image, _) in example_digits().items():
        path = dest / f"{name}.png"
        example_image(image).save(path, format="PNG", optimize=False)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=EXAMPLES, help="default: examples/")
    args = parser.parse_args(argv)
    for path in write_examples(args.dest):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
