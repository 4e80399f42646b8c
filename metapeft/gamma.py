"""The learned modulators as a table (layers x positions) and as a heatmap like the paper's position x depth figure."""

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

    ``values``: float32 CPU tensor (len(layer_labels), len(position_labels)), NaN where no module sits.
    On a ViT rows are blocks (``"0"``, ``"1"``, ...) and columns positions (``q k v out mlp1 mlp2`` for LoRA,
    ``mlp`` for AdaptFormer, ``attn mlp`` for adapters); on the generic path rows are module names and the
    single column is ``"gamma"``.
    """

    values: torch.Tensor
    layer_labels: tuple[str, ...]
    position_labels: tuple[str, ...]

    def __str__(self) -> str:
        width = max(len(label) for label in self.position_labels + ("gamma",)) + 1
        row_width = max(len(label) for label in self.layer_labels + ("layer",))
        lines = ["layer".ljust(row_width) + "".join(p.rjust(width + 1) for p in self.position_labels)]
        for label, row in zip(self.layer_labels, self.values.tolist()):
            cells = ("-" if math.isnan(v) else f"{v:.3f}" for v in row)
            lines.append(label.ljust(row_width) + "".join(c.rjust(width + 1) for c in cells))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """A JSON-serialisable copy: ``{"rows", "columns", "values"}`` with None where no module sits."""
        values = [[None if math.isnan(v) else v for v in row] for row in self.values.tolist()]
        return {"rows": list(self.layer_labels), "columns": list(self.position_labels), "values": values}

    @classmethod
    def mean(cls, tables: list[dict]) -> GammaTable:
        """The element-wise mean of tables given as :meth:`to_dict` dicts of the same layout (e.g. one per seed)."""
        if not tables:
            raise ValueError("GammaTable.mean needs at least one table")
        layouts = {(tuple(t["rows"]), tuple(t["columns"])) for t in tables}
        if len(layouts) > 1:
            raise ValueError(f"the gamma tables have different layouts: {sorted(layouts)[:2]}")
        values = torch.tensor([[[math.nan if v is None else v for v in row] for row in t["values"]] for t in tables])
        return cls(values.mean(0), tuple(tables[0]["rows"]), tuple(tables[0]["columns"]))


def gamma_table(model: nn.Module) -> GammaTable:
    """gamma of every module :func:`metapeft.inject` placed in ``model``, as a :class:`GammaTable`."""
    config = injection_config(model)
    model = unwrap_model(model)
    values = torch.full((len(config.rows), len(config.columns)), float("nan"))
    row_index = {label: i for i, label in enumerate(config.rows)}
    column_index = {label: j for j, label in enumerate(config.columns)}
    for placement in config.placements:
        gamma = model.get_submodule(placement.module).gamma.detach().float().cpu()
        for column, value in zip(placement.columns, gamma):
            values[row_index[placement.row], column_index[column]] = value
    return GammaTable(values, config.rows, config.columns)


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
    draw_table(figure.add_subplot(), table, "gamma", title or "MetaPEFT gamma")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return os.fspath(path)
