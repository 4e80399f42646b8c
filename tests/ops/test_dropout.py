"""The torch backend's dropout rule: masks from a seed, and per-sample masks under vmap(randomness="different")
(each sample's seed is a batched tensor no generator can take; it failed with vmap's ``.item()`` error)."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import metapeft
from metapeft.ops.dropout import dropout_keep_mask, hashed_keep_mask


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_hashed_masks_keep_one_minus_p_independently_of_each_other(p):
    n = 200_000
    sigma = (p * (1 - p) / n) ** 0.5
    first, second = (hashed_keep_mask((400, 500), p, torch.tensor(seed), torch.device("cpu")) for seed in (7, 8))
    assert abs(first.float().mean().item() - (1 - p)) < 5 * sigma
    agree = (first == second).float().mean().item()  # independent masks agree with probability p^2 + (1-p)^2
    assert abs(agree - (p * p + (1 - p) ** 2)) < 5 * (agree * (1 - agree) / n) ** 0.5
    assert torch.equal(first, hashed_keep_mask((400, 500), p, torch.tensor(7), torch.device("cpu")))


def layers():
    torch.manual_seed(0)
    lora = metapeft.FusedMetaLoRA(nn.Linear(16, 16), 4, dropout=0.5, backend="torch")
    adapter = metapeft.FusedMetaAdapter(16, 4, kind="sequential", dropout=0.5, backend="torch")
    for parameter in (lora.lora_B, adapter.up_weight):
        nn.init.normal_(parameter)
    return {"lora": lora, "adapter": adapter}


@pytest.mark.parametrize("kind", ["lora", "adapter"])
def test_vmap_with_different_randomness_gives_each_sample_its_own_mask(kind):
    layer = layers()[kind].train()
    x = torch.randn(1, 5, 16).expand(64, 5, 16)  # one input, 64 samples
    out = vmap(layer, randomness="different")(x)
    assert out.shape == (64, 5, 16) and len({tuple(o.flatten().tolist()) for o in out}) == 64
    same = vmap(layer, randomness="same")(x)
    assert all(torch.equal(same[0], o) for o in same)
    with torch.no_grad():  # inverted dropout is unbiased: the samples' mean is near the layer without dropout
        layer.eval()
        undropped = layer(x[0])
    spread = (out - undropped).std(0).max().item()
    assert (out.mean(0) - undropped).abs().max().item() < 5 * spread / 64 ** 0.5


def test_per_sample_gradients_under_vmap_of_grad_use_each_sample_s_mask():
    """vmap(grad) with different randomness: each sample's gradient of lora_A is that of its own forward, i.e.
    zero in exactly the input columns its mask dropped for every row (one token, so a dropped x entry zeroes dA's
    column)."""
    layer = layers()["lora"].train()
    params = dict(layer.named_parameters())
    x = torch.randn(32, 1, 16)
    grads = vmap(grad(lambda p, xi: functional_call(layer, p, (xi,)).sum()), in_dims=(None, 0),
                 randomness="different")(params, x)["lora_A"]
    dropped = (grads == 0).all(dim=1)  # (samples, K): columns of dA that are zero
    assert 0.3 < dropped.float().mean().item() < 0.7 and len({tuple(d.tolist()) for d in dropped}) > 16


def test_generator_masks_are_unchanged_for_plain_seeds():
    expected = torch.rand((30, 7), generator=torch.Generator().manual_seed(99)) >= 0.25
    assert torch.equal(dropout_keep_mask((30, 7), 0.25, torch.tensor(99), torch.device("cpu")), expected)
