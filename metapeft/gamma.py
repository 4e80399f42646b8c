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


def plot_gamma(model_or_table: nn.Module | GammaTable, path: str | os.PathLike, title: str | None = None) -> str:
    """Write ``gamma_table(model)`` (or a given table) as a heatmap PNG (positions x depth; blank where no module)
    through a standalone matplotlib ``Figure`` (Agg canvas, no pyplot state); returns the path."""
    from matplotlib.figure import Figure

    table = model_or_table if isinstance(model_or_table, GammaTable) else gamma_table(model_or_table)
    rows, columns = table.layer_labels, table.position_labels
    figure = Figure(figsize=(1.5 + 0.45 * len(rows), 1.5 + 0.45 * len(columns)))
    axes = figure.add_subplot()
    image = axes.imshow(table.values.t().numpy(), cmap="viridis", aspect="auto", interpolation="nearest")
    axes.set_xticks(range(len(rows)), rows, rotation=90 if max(len(r) for r in rows) > 3 else 0)
    axes.set_yticks(range(len(columns)), columns)
    axes.set_xlabel("layer")
    axes.set_ylabel("position")
    axes.set_title(title or "MetaPEFT gamma")
    figure.colorbar(image, ax=axes, label="gamma")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return os.fspath(path)
