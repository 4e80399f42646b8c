"""Image files: decoding with errors that name the file, never a silently dropped sample."""

from __future__ import annotations

import os

from PIL import Image


class ImageDecodeError(OSError):
    """An image file that cannot be opened or decoded; the message and ``path`` name it. Constructible from the
    message alone, so a DataLoader worker's error is re-raised in the main process as this type (``path`` None
    there; the message still names the file)."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
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
        raise ImageDecodeError(f"cannot decode image {path}: {type(error).__name__}: {error}", path) from error
