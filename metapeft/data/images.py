"""Image files: decoding with errors that name the file, never a silently dropped sample."""

from __future__ import annotations

import os

from PIL import Image


class ImageDecodeError(OSError):
    """An image file that exists in the index but cannot be opened or decoded; ``path`` names it."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot decode image {path}: {reason}")
        self.path = path


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode ``path`` as an RGB ``PIL.Image`` (grayscale / SAR / palette images are converted).

    Raises :class:`ImageDecodeError` naming the path when the file is missing, truncated or not an image.
    """
    path = os.fspath(path)
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ImageDecodeError(path, f"{type(error).__name__}: {error}") from error
