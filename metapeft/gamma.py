"""The learned modulators as a table (layers x positions) and as a heatmap like the paper's position x depth figure.

A per-channel gamma (``gamma="channel"``) is summarised per cell: the mean over the cell's output channels, and
their spread (standard deviation) beside it."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from metapeft.inject import injection_config, unwrap_model


@dataclass(frozen=True)
class GammaTable:
    """gamma per (layer, position).

    ``values``: float32 CPU tensor (len(layer_labels), len(position_labels)), NaN where no module sits; with
    per-channel gammas the mean over the cell's channels. ``spread``: None when every gamma is one number, else a
    tensor like ``values`` holding the standard deviation over each cell's channels. On a ViT rows are blocks
    (``"0"``, ``"1"``, ...) and columns positions (``q k v out mlp1 mlp2`` for LoRA, ``mlp`` for AdaptFormer,
    ``attn mlp`` for adapters); on the generic path rows are module names and the single column is ``"gamma"``.
    """

    values: torch.Tensor
    layer_labels: tuple[str, ...]
    position_labels: tuple[str, ...]
    spread: torch.Tensor | None = None

    def __str__(self) -> str:
        spreads = self.spread.tolist() if self.spread is not None else [[None] * len(r) for r in self.values.tolist()]
        rows = [[_cell(v, sd) for v, sd in zip(row, sd_row)] for row, sd_row in zip(self.values.tolist(), spreads)]
        width = max(len(label) for label in self.position_labels + ("gamma",) + tuple(c for r in rows for c in r)) + 1
        row_width = max(len(label) for label in self.layer_labels + ("layer",))
        lines = ["layer".ljust(row_width) + "".join(p.rjust(width + 1) for p in self.position_labels)]
        for label, cells in zip(self.layer_labels, rows):
            lines.append(label.ljust(row_width) + "".join(c.rjust(width + 1) for c in cells))
        if self.spread is not None:
            lines.append("(per-channel gamma: mean +- standard deviation over each cell's output channels)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """A JSON-serialisable copy: ``{"rows", "columns", "values"}`` (and ``"spread"`` for per-channel gammas) with
        None where no module sits."""
        table = {"rows": list(self.layer_labels), "columns": list(self.position_labels),
                 "values": _nested_list(self.values)}
        if self.spread is not None:
            table["spread"] = _nested_list(self.spread)
        return table

    @classmethod
    def mean(cls, tables: list[dict]) -> GammaTable:
        """The element-wise mean of tables given as :meth:`to_dict` dicts of the same layout (e.g. one per seed); the
        spread, where every table has one, is averaged the same way (the mean within-cell spread)."""
        if not tables:
            raise ValueError("GammaTable.mean needs at least one table")
        layouts = {(tuple(t["rows"]), tuple(t["columns"])) for t in tables}
        if len(layouts) > 1:
            raise ValueError(f"the gamma tables have different layouts: {sorted(layouts)[:2]}")
        spread = None
        if all("spread" in t for t in tables):
            spread = _from_nested([t["spread"] for t in tables]).mean(0)
        return cls(_from_nested([t["values"] for t in tables]).mean(0), tuple(tables[0]["rows"]),
                   tuple(tables[0]["columns"]), spread)


def _cell(value: float, spread: float | None) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:.3f}" if spread is None or math.isnan(spread) else f"{value:.3f}+-{spread:.3f}"


def _nested_list(values: torch.Tensor) -> list[list[float | None]]:
    return [[None if math.isnan(v) else v for v in row] for row in values.tolist()]


def _from_nested(tables: list[list[list[float | None]]]) -> torch.Tensor:
    return torch.tensor([[[math.nan if v is None else v for v in row] for row in t] for t in tables])


def gamma_table(model: nn.Module) -> GammaTable:
    """gamma of every module :func:`metapeft.inject` placed in ``model``, as a :class:`GammaTable`; per-channel gammas
    (``gamma="channel"``) as the mean and the standard deviation over each cell's channels."""
    config = injection_config(model)
    model = unwrap_model(model)
    values = torch.full((len(config.rows), len(config.columns)), float("nan"))
    spread = values.clone() if config.gamma == "channel" else None
    row_index = {label: i for i, label in enumerate(config.rows)}
    column_index = {label: j for j, label in enumerate(config.columns)}
    for placement in config.placements:
        gamma = model.get_submodule(placement.module).gamma.detach().double().cpu()
        for column, channels in zip(placement.columns, gamma.view(len(placement.columns), -1)):
            cell = row_index[placement.row], column_index[column]
            values[cell] = channels.mean()
            if spread is not None:
                spread[cell] = channels.std(correction=0)
    return GammaTable(values, config.rows, config.columns, spread)


def draw_table(axes, table: GammaTable, label: str, title: str, cmap: str = "viridis",
               annotate: str | None = None) -> None:
    """Draw ``table`` on matplotlib ``axes`` as a heatmap, positions (rows of the image) x layers (columns), blank
    where no module sits, with a colorbar labelled ``label``; ``annotate`` (a format spec such as ``".2f"``) writes
    each value in its cell."""
    from matplotlib.patheffects import withStroke

    rows, columns = table.layer_labels, table.position_labels
    image = axes.imshow(table.values.t().numpy(), cmap=cmap, aspect="auto", interpolation="nearest")
    axes.set_xticks(range(len(rows)), rows, rotation=90 if max(len(r) for r in rows) > 3 else 0)
    axes.set_yticks(range(len(columns)), columns)
    axes.set_xlabel("layer")
    axes.set_ylabel("position")
    axes.set_title(title, fontsize=9)
    if annotate is not None:
        for i, row in enumerate(table.values.tolist()):
            for j, value in enumerate(row):
                if not math.isnan(value):
                    axes.text(i, j, format(value, annotate), ha="center", va="center", fontsize=6, color="white",
                              path_effects=[withStroke(linewidth=1.5, foreground="black")])
    axes.figure.colorbar(image, ax=axes, label=label)


def plot_gamma(model_or_table: nn.Module | GammaTable, path: str | os.PathLike, title: str | None = None) -> str:
    """Write ``gamma_table(model)`` (or a given table) as a heatmap PNG (positions x depth; blank where no module)
    through a standalone matplotlib ``Figure`` (Agg canvas, no pyplot state); returns the path."""
    from matplotlib.figure import Figure

    table = model_or_table if isinstance(model_or_table, GammaTable) else gamma_table(model_or_table)
    figure = Figure(figsize=(1.5 + 0.45 * len(table.layer_labels), 1.5 + 0.45 * len(table.position_labels)))
    label = "gamma" if table.spread is None else "gamma (mean over output channels)"
    draw_table(figure.add_subplot(), table, label, title or "MetaPEFT gamma")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return os.fspath(path)
