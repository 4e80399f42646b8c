"""gamma_table / plot_gamma: values at the right (layer, position), NaN elsewhere, a real PNG."""

import math

import pytest
import torch
from torch import nn

import metapeft
from metapeft.gamma import GammaTable, plot_gamma
from tests.helpers.vit import tiny_vit


def set_gamma(module, values):
    """Set a module's modulator so that softplus(modulator) == values."""
    with torch.no_grad():
        module.modulator.copy_(torch.log(torch.expm1(torch.tensor(values, dtype=torch.float64))))


def test_table_has_gamma_at_placed_positions_and_nan_elsewhere():
    model = tiny_vit()
    metapeft.inject(model, positions=("k", "v", "mlp2"), layers=[0, 2], rank=2)
    set_gamma(model.blocks[0].attn.qkv, [0.25, 1.5])
    set_gamma(model.blocks[2].attn.qkv, [2.0, 0.125])
    set_gamma(model.blocks[0].mlp.fc2, [0.75])
    table = metapeft.gamma_table(model)
    assert table.layer_labels == ("0", "1", "2")
    assert table.position_labels == ("q", "k", "v", "out", "mlp1", "mlp2")
    nan = math.nan
    expected = torch.tensor([
        [nan, 0.25, 1.5, nan, nan, 0.75],
        [nan, nan, nan, nan, nan, nan],
        [nan, 2.0, 0.125, nan, nan, 1.0],
    ])
    torch.testing.assert_close(table.values, expected, equal_nan=True)
    text = str(table)
    assert text.splitlines()[0].split() == ["layer", "q", "k", "v", "out", "mlp1", "mlp2"]
    assert text.splitlines()[3].split() == ["2", "-", "2.000", "0.125", "-", "-", "1.000"]


def test_per_channel_gamma_is_summarised_by_mean_and_spread_per_cell(tmp_path):
    """gamma="channel": each cell holds the mean of its output channels' gammas and the table their standard
    deviation; a q, v fused qkv splits its (2*48,) gammas into the q and the v cell."""
    model = tiny_vit()
    metapeft.inject(model, positions=("q", "v", "mlp2"), layers=[1], rank=2, gamma="channel")
    q = [0.5] * 24 + [1.5] * 24  # mean 1, standard deviation 0.5
    v = [0.25 + 0.01 * i for i in range(48)]
    set_gamma(model.blocks[1].attn.qkv, q + v)
    set_gamma(model.blocks[1].mlp.fc2, [2.0] * 48)
    table = metapeft.gamma_table(model)
    v64 = torch.tensor(v, dtype=torch.float64)
    torch.testing.assert_close(table.values[1, [0, 2, 5]], torch.tensor([1.0, v64.mean().item(), 2.0]))
    torch.testing.assert_close(table.spread[1, [0, 2, 5]], torch.tensor([0.5, v64.std(correction=0).item(), 0.0]),
                               atol=1e-6, rtol=1e-6)
    assert torch.isnan(table.spread[0]).all() and torch.isnan(table.spread[1, 1])
    assert "1.000+-0.500" in str(table).splitlines()[2]
    again = GammaTable.mean([table.to_dict(), table.to_dict()])
    torch.testing.assert_close(again.spread, table.spread, equal_nan=True)
    assert metapeft.gamma_table(tiny_vit_injected_scalar()).spread is None
    assert plot_gamma(table, tmp_path / "channel.png")


def tiny_vit_injected_scalar():
    model = tiny_vit()
    metapeft.inject(model, positions=("q",), rank=2)
    return model


def test_fixed_scale_table_and_generic_rows():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    metapeft.inject(model, target_modules=["0", "2"], rank=2, meta=False, init_gamma=0.5)
    table = metapeft.gamma_table(model)
    assert table.layer_labels == ("0", "2") and table.position_labels == ("gamma",)
    torch.testing.assert_close(table.values, torch.full((2, 1), 0.5))


def test_adapter_table_columns():
    model = tiny_vit()
    metapeft.inject(model, method="adapter", positions=("mlp",), layers=[1], rank=2, init_gamma=0.3)
    table = metapeft.gamma_table(model)
    assert table.position_labels == ("attn", "mlp")
    expected = torch.tensor([[math.nan, math.nan], [math.nan, 0.3], [math.nan, math.nan]])
    torch.testing.assert_close(table.values, expected, equal_nan=True)


def test_plot_writes_a_png_heatmap(tmp_path):
    import matplotlib.image

    model = tiny_vit()
    metapeft.inject(model, rank=2)
    path = metapeft.gamma.plot_gamma(model, tmp_path / "gamma.png")
    with open(path, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    table_path = metapeft.gamma.plot_gamma(metapeft.gamma_table(model), tmp_path / "table.png", title="from a table")
    assert (tmp_path / "table.png").stat().st_size > 1000 and table_path.endswith("table.png")


def test_table_of_uninjected_model_is_a_clear_error():
    with pytest.raises(ValueError, match="no metapeft injection"):
        metapeft.gamma_table(tiny_vit(depth=1))
