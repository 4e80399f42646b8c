"""gamma_table / plot_gamma: values at the right (layer, position), NaN elsewhere, a real PNG."""

import math

import pytest
import torch
from torch import nn

import metapeft
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
