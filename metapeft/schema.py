"""Configuration dataclasses that document themselves: :func:`option` declares a field with its help text,
:func:`option_docs` reads every field back (name, type, default, help) for the configuration reference
(``metapeft config``, docs/config.md) and for docstrings."""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass

REQUIRED = MISSING  # the default of an option without one


@dataclass(frozen=True)
class OptionDoc:
    """One documented field: ``type`` as written in the annotation, ``default`` (:data:`REQUIRED` when it has
    none), ``help``."""

    name: str
    type: str
    default: object
    help: str
    example: object = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


def option(default=REQUIRED, help: str = "", example=None):
    """A dataclass field with ``metadata["help"]`` (and ``metadata["example"]``: a value to show for a required
    field); a list or dict default becomes a factory (a fresh copy per instance)."""
    metadata = {"help": help} if example is None else {"help": help, "example": example}
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def option_docs(cls, exclude: tuple[str, ...] = ()) -> list[OptionDoc]:
    """The documented fields of the dataclass ``cls`` in declaration order (``exclude``: names left out)."""
    docs = []
    for spec in dataclasses.fields(cls):
        if spec.name in exclude:
            continue
        default = spec.default
        if spec.default_factory is not MISSING:
            default = spec.default_factory()
        docs.append(OptionDoc(spec.name, str(spec.type), default, spec.metadata.get("help", ""),
                              spec.metadata.get("example")))
    return docs


def options_text(cls, indent: str = "    ") -> str:
    """``name (type, default X): help``, one line per field of ``cls``, for a docstring."""
    return "\n".join(f"{indent}{d.name} ({d.type}, " + ("required" if d.required else f"default {d.default!r}")
                     + f"): {d.help}" for d in option_docs(cls))
