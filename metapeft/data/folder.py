"""``torchvision``-style ImageFolder trees (``root/<class name>/<image>``) with path-naming decode errors."""

from __future__ import annotations

import os
from collections.abc import Callable

from torchvision.datasets import ImageFolder

from metapeft.data.images import load_image


def image_folder(root: str | os.PathLike, transform: Callable | None = None) -> ImageFolder:
    """``ImageFolder(root)`` whose images load through :func:`metapeft.data.images.load_image` (RGB; an undecodable
    file raises :class:`~metapeft.data.images.ImageDecodeError` with its path). Classes are the sorted sub-folder
    names (label i -> ``classes[i]``); ``targets`` holds the labels. A missing root raises ``FileNotFoundError``."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder root {os.fspath(root)} is not a directory")
    return ImageFolder(os.fspath(root), transform=transform, loader=load_image)
