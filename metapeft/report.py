"""Result files of the apps (demo, sweep, benchmarks): atomic text and JSON writes, and README sections generated
from results (the text between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` markers), never typed by hand."""

from __future__ import annotations

import json
import os
from pathlib import Path

from metapeft.atomic_files import atomic_write


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (:func:`metapeft.atomic_files.atomic_write`: a crash never leaves a torn
    file)."""
    return atomic_write(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, value) -> Path:
    """:func:`write_text` of ``value`` as strict JSON (a NaN is an error, not a non-standard token)."""
    return write_text(path, json.dumps(value, indent=1, allow_nan=False) + "\n")


def replace_section(path: str | os.PathLike, name: str, text: str) -> Path:
    """Replace what lies between the lines ``<!-- name:start -->`` and ``<!-- name:end -->`` of the text file
    ``path`` by ``text`` (markers kept); a missing or repeated marker is an error naming it."""
    path = Path(path)
    content = path.read_text(encoding="utf-8")
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    for marker in (start, end):
        if content.count(marker) != 1:
            raise ValueError(f"{path} must hold the marker {marker!r} exactly once, found {content.count(marker)}")
    head, rest = content.split(start)
    _, tail = rest.split(end)
    return write_text(path, f"{head}{start}\n{text.strip()}\n{end}{tail}")
