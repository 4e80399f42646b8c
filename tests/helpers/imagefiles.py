"""Tiny on-disk image datasets for the data and CLI tests: real digits (scikit-learn) written as PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def digit_images(count: int, size: int = 16, seed: int = 0) -> tuple[list[Image.Image], np.ndarray]:
    """``count`` RGB digit images (size x size) and their labels (0..9), shuffled with ``seed``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))[:count]
    images = [Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).convert("RGB").resize((size, size))
              for i in order]
    return images, digits.target[order]


def write_index_dataset(root: Path, counts: dict[str, list[int]], size: int = 16, seed: int = 0) -> Path:
    """Write ``root/images/<split>/<n>.png`` and ``root/<split>.txt`` index files: ``counts[split][c]`` images of
    class c (digits of class c) per split. Returns ``root``."""
    wanted = sum(sum(c) for c in counts.values())
    images, labels = digit_images(1797, size, seed)
    pools = {c: [img for img, label in zip(images, labels) if label == c] for c in range(10)}
    if wanted > 1797:
        raise ValueError("not enough digits")
    for split, per_class in counts.items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        lines = []
        for c, count in enumerate(per_class):
            for _ in range(count):
                image = pools[c].pop()
                relative = f"images/{split}/{len(lines)}.png"
                image.save(root / relative)
                lines.append(f"{relative} {c}")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def tiny_split_dataset(root):
    """The CLI tests' tiny index dataset under ``root``: 4 classes, long-tailed training split (20/10/5/3 images),
    balanced test split (4 each), 16x16 PNGs, and a head/tail ``split.yaml``. Returns the dataset root."""
    root = write_index_dataset(root, {"train": [20, 10, 5, 3], "test": [4] * 4})
    (root / "split.yaml").write_text("classes: [zero, one, two, three]\nhead: [zero, one]\ntail: [two, three]\n")
    return root
