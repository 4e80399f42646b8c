"""The hypergradient engine against an independent brute force, in float64 (``tests.helpers.meta``): the
reference twin differentiated twice by ``torch.func`` through the unrolled look-ahead, ``grad_rho
L_val(phi_K(rho), rho)`` with ``phi_{k+1} = phi_k - lr * (grad_phi L_train(phi_k, rho) + wd * phi_k + mu * m_k)``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metapeft
from metapeft.meta import hypergradient, trainable_phi
from tests.helpers.meta import (
    adapter_net,
    batches,
    brute_force,
    classification_loss,
    independent_lr_scales,
    lora_mlp,
    lora_vit,
    momentum_buffers,
    more_train_batches,
    randomize_lora,
    relative_error,
)

LR, MOMENTUM, WEIGHT_DECAY = 0.3, 0.9, 0.05


@pytest.fixture(scope="module")
def vit_case():
    torch.manual_seed(1)
    model = lora_vit()
    train, val = batches("vit")
    buffers = momentum_buffers(model)
    oracle = brute_force(model, train, val, lr=LR, momentum=MOMENTUM, buffers=buffers, weight_decay=WEIGHT_DECAY)
    return model, train, val, buffers, oracle


@pytest.mark.parametrize("segments", [1, 3], ids=lambda s: f"S{s}")
@pytest.mark.parametrize("with_momentum", [False, True], ids=["plain", "momentum_wd"])
@pytest.mark.parametrize("gamma", ["scalar", "channel"])
def test_mlp_all_modes_match_brute_force(segments, with_momentum, gamma):
    model = lora_mlp(segments, gamma=gamma)
    train, val = batches("mlp")
    kwargs = {"momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY} if with_momentum else {}
    buffers = momentum_buffers(model) if with_momentum else None
    hyper, direct, phi_next, g = brute_force(model, train, val, lr=LR, buffers=buffers, **kwargs)
    results = {mode: hypergradient(model, classification_loss, train, val, lr=LR, momentum_buffers=buffers,
                                   mode=mode, **kwargs) for mode in metapeft.meta.MODES}
    assert relative_error(results["exact"].meta_grads, hyper) < 1e-8
    assert relative_error(results["finite_difference"].meta_grads, hyper) < 1e-4
    assert relative_error(results["first_order"].meta_grads, direct) < 1e-12
    assert relative_error(hyper, direct) > 1e-3, "the second-order term must matter in this test"
    for result in results.values():
        assert relative_error(result.lookahead, phi_next) < 1e-12
        assert relative_error(result.phi_grads, g) < 1e-12
        assert result.val_loss.shape == () and result.train_loss.shape == ()


@pytest.mark.parametrize("mode", ["exact", "finite_difference", "first_order"])
def test_vit_matches_brute_force(vit_case, mode):
    model, train, val, buffers, (hyper, direct, phi_next, g) = vit_case
    fused = [m for m in model.modules() if hasattr(m, "fused_attn")]
    assert fused and all(m.fused_attn for m in fused), "the ViT must start on fused SDPA attention"
    result = hypergradient(model, classification_loss, train, val, lr=LR, momentum=MOMENTUM,
                           momentum_buffers=buffers, weight_decay=WEIGHT_DECAY, mode=mode)
    expected, tolerance = {"exact": (hyper, 1e-8), "finite_difference": (hyper, 1e-4),
                           "first_order": (direct, 1e-12)}[mode]
    assert relative_error(result.meta_grads, expected) < tolerance
    assert relative_error(result.lookahead, phi_next) < 1e-12
    assert relative_error(result.phi_grads, g) < 1e-12
    assert all(m.fused_attn for m in fused), "fused attention must be restored after the meta step"


@pytest.mark.parametrize("mode", ["exact", "finite_difference", "first_order"])
@pytest.mark.parametrize("gamma", ["scalar", "channel"])
def test_adapters_match_brute_force(mode, gamma):
    model = adapter_net(gamma)
    train, val = batches("mlp")
    buffers = momentum_buffers(model)
    hyper, direct, phi_next, _ = brute_force(model, train, val, lr=LR, momentum=MOMENTUM, buffers=buffers,
                                             weight_decay=WEIGHT_DECAY)
    result = hypergradient(model, classification_loss, train, val, lr=LR, momentum=MOMENTUM, momentum_buffers=buffers,
                           weight_decay=WEIGHT_DECAY, mode=mode)
    expected, tolerance = {"exact": (hyper, 1e-8), "finite_difference": (hyper, 1e-4),
                           "first_order": (direct, 1e-12)}[mode]
    assert relative_error(result.meta_grads, expected) < tolerance
    assert relative_error(result.lookahead, phi_next) < 1e-12
    assert relative_error(hyper, direct) > 1e-3


@pytest.mark.parametrize("steps", [2, 3], ids=lambda k: f"K{k}")
@pytest.mark.parametrize("kind", ["lora", "adapters"])
def test_lookahead_steps_match_unrolled_brute_force(kind, steps):
    model = lora_mlp(3) if kind == "lora" else adapter_net()
    train, val = batches("mlp")
    more = more_train_batches(steps)
    buffers = momentum_buffers(model)
    kwargs = {"lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY}
    hyper, direct, phi_next, g = brute_force(model, train, val, buffers=buffers, lookahead_batches=more, **kwargs)
    one_step = brute_force(model, train, val, buffers=buffers, **kwargs)
    assert relative_error(phi_next, one_step[2]) > 1e-2, "the later steps must move phi"
    assert relative_error(hyper, one_step[0]) > 1e-3, "the later steps must change the hypergradient"
    assert relative_error(hyper, direct) > 1e-3, "the second-order terms must matter in this test"
    # finite differences: O(eps^2) truncation per step (2.7e-4 measured at K = 3 with the default 0.01 radius;
    # fd_epsilon = 1e-5 brings it to 1e-8 (LoRA) and 1e-7 (adapters): a correct central difference's quadratic
    # convergence)
    cases = {"exact": ({}, hyper, 1e-8), "finite_difference": ({}, hyper, 1e-3),
             "fd_small_eps": ({"mode": "finite_difference", "fd_epsilon": 1e-5}, hyper, 1e-6),
             "first_order": ({}, direct, 1e-12)}
    for name, (extra, expected, tolerance) in cases.items():
        extra = extra or {"mode": name}
        result = hypergradient(model, classification_loss, train, val, momentum_buffers=buffers,
                               lookahead_batches=more, **kwargs, **extra)
        assert relative_error(result.meta_grads, expected) < tolerance, name
        assert relative_error(result.lookahead, phi_next) < 1e-12, name
        assert relative_error(result.phi_grads, g) < 1e-12, name


def test_lookahead_finite_difference_replays_each_steps_dropout_masks():
    model = lora_mlp(3, dropout=0.25).train()
    train, val = batches("mlp")
    more = more_train_batches(3)
    torch.manual_seed(7)
    exact = hypergradient(model, classification_loss, train, val, lr=LR, momentum=MOMENTUM, lookahead_batches=more)
    rng_after = torch.get_rng_state()
    torch.manual_seed(7)
    fd = hypergradient(model, classification_loss, train, val, lr=LR, momentum=MOMENTUM, lookahead_batches=more,
                       mode="finite_difference")
    assert relative_error(fd.meta_grads, exact.meta_grads) < 1e-4
    assert relative_error(fd.lookahead, exact.lookahead) < 1e-12, "the look-ahead steps draw the same masks"
    assert torch.equal(torch.get_rng_state(), rng_after)


def test_fused_sdpa_has_no_double_backward_without_math_attention(vit_case):
    model, train, _, _, _ = vit_case
    phi, rho = trainable_phi(model), metapeft.meta_parameters(model)
    grads = torch.autograd.grad(classification_loss(model, train), phi, create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.autograd.grad(grads, rho, grad_outputs=[torch.ones_like(g) for g in grads])


class SdpaModel(nn.Module):
    """Self-attention through ``F.scaled_dot_product_attention`` directly (not timm), LoRA on q/k/v and output."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = metapeft.FusedMetaLoRA(nn.Linear(8, 24), rank=2, segments=3)
        self.out = metapeft.FusedMetaLoRA(nn.Linear(8, 3), rank=2)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2).mean(1))


def test_exact_through_plain_sdpa_call():
    model = SdpaModel().double()
    randomize_lora(model)
    train = (torch.randn(4, 5, 8, dtype=torch.float64), torch.randint(0, 3, (4,)))
    val = (torch.randn(3, 5, 8, dtype=torch.float64), torch.randint(0, 3, (3,)))
    exact = hypergradient(model, classification_loss, train, val, lr=LR).meta_grads
    assert relative_error(exact, brute_force(model, train, val, lr=LR)[0]) < 1e-8


def test_model_parameters_grads_and_rng_left_as_they_were():
    model = lora_mlp(3, dropout=0.25).train()
    train, val = batches("mlp")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    objects = {n: p for n, p in model.named_parameters()}
    rng_after = {}
    for mode in metapeft.meta.MODES:
        torch.manual_seed(5)
        hypergradient(model, classification_loss, train, val, lr=LR, mode=mode)
        rng_after[mode] = torch.get_rng_state()
        for n, p in model.named_parameters():
            assert p is objects[n] and torch.equal(p, before[n]) and p.grad is None, n
    assert torch.equal(rng_after["exact"], rng_after["finite_difference"])
    assert torch.equal(rng_after["exact"], rng_after["first_order"])


def test_finite_difference_replays_dropout_masks():
    model = lora_mlp(3, dropout=0.25).train()
    train, val = batches("mlp")
    torch.manual_seed(7)
    exact = hypergradient(model, classification_loss, train, val, lr=LR).meta_grads
    torch.manual_seed(7)
    fd = hypergradient(model, classification_loss, train, val, lr=LR, mode="finite_difference").meta_grads
    assert relative_error(fd, exact) < 1e-4


def test_fd_epsilon_sets_the_step():
    model = lora_mlp(1)
    train, val = batches("mlp")
    exact = hypergradient(model, classification_loss, train, val, lr=LR).meta_grads
    fine = hypergradient(model, classification_loss, train, val, lr=LR, mode="finite_difference", fd_epsilon=1e-4)
    coarse = hypergradient(model, classification_loss, train, val, lr=LR, mode="finite_difference", fd_epsilon=0.5)
    assert relative_error(fine.meta_grads, exact) < 1e-7 < relative_error(coarse.meta_grads, exact)


def test_bad_arguments_are_named():
    model = lora_mlp(1)
    train, val = batches("mlp")
    with pytest.raises(ValueError, match="mode"):
        hypergradient(model, classification_loss, train, val, lr=LR, mode="second_order")
    with pytest.raises(ValueError, match="lr"):
        hypergradient(model, classification_loss, train, val, lr=-1.0)
    with pytest.raises(ValueError, match="fd_epsilon"):
        hypergradient(model, classification_loss, train, val, lr=LR, fd_epsilon=1e-3)
    with pytest.raises(ValueError, match=r"momentum_buffers\[1\]"):
        buffers = [torch.zeros_like(p) for p in trainable_phi(model)]
        buffers[1] = torch.zeros(3)
        hypergradient(model, classification_loss, train, val, lr=LR, momentum=0.9, momentum_buffers=buffers)
    with pytest.raises(ValueError, match="momentum_buffers"):
        hypergradient(model, classification_loss, train, val, lr=LR, momentum_buffers=[None])
    with pytest.raises(ValueError, match="lookahead_batches"):
        hypergradient(model, classification_loss, train, val, lr=LR, lookahead_batches=train[0])
    with pytest.raises(ValueError, match="scalar"):
        hypergradient(model, lambda m, b: m(b[0]), train, val, lr=LR)
    frozen_modulators = nn.Sequential(metapeft.FusedMetaLoRA(nn.Linear(10, 4), rank=2, meta=False)).double()
    with pytest.raises(ValueError, match="meta_parameters"):
        hypergradient(frozen_modulators, classification_loss, train, val, lr=LR)


class LongTailedNet(nn.Module):
    """Frozen random backbone with two LoRA positions: ``good`` adapts the features the labels depend on;
    ``bad`` adds a rank-2 projection of label-independent nuisance inputs to the same features (harmful by
    construction: its B starts large, so its gamma-scaled output is pure noise for the classifier)."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.stem = nn.Linear(12, 24)
        self.good = metapeft.FusedMetaLoRA(nn.Linear(24, 24), rank=4)
        self.bad = metapeft.FusedMetaLoRA(nn.Linear(6, 24, bias=False), rank=2)
        self.head = nn.Linear(24, classes)
        with torch.no_grad():
            self.bad.base.weight.zero_()
            self.bad.lora_B.normal_(std=1.5)
        metapeft.mark_only_peft_trainable(self, extra=(self.head,))

    def forward(self, inputs):
        x, nuisance = inputs
        return self.head(F.gelu(self.good(F.gelu(self.stem(x)))) + self.bad(nuisance))


def long_tailed_data(counts: list[int]):
    """Labels from a fixed random linear rule on x, kept class by class up to the long-tailed ``counts``."""
    rule = torch.randn(12, len(counts))
    x = torch.randn(20000, 12)
    label = (x @ rule).argmax(1)
    index = torch.cat([torch.nonzero(label == k).flatten()[:c] for k, c in enumerate(counts)])
    assert torch.equal(torch.bincount(label[index]), torch.tensor(counts))
    return x[index], label[index]


@pytest.mark.parametrize("mode", ["exact", "finite_difference"])
def test_meta_steps_lower_meta_loss_and_switch_off_the_harmful_position(mode):
    torch.manual_seed(3)
    counts = [120, 60, 25, 10, 5]
    model = LongTailedNet(len(counts))
    x, y = long_tailed_data(counts)
    meta_mask = torch.rand(len(y)) < 0.2
    train_set = (x[~meta_mask], y[~meta_mask])
    meta_set = (x[meta_mask], y[meta_mask])

    def draw(data, size):
        index = torch.randint(0, len(data[1]), (size,))
        return (data[0][index], torch.randn(size, 6)), data[1][index]

    inner = torch.optim.SGD(trainable_phi(model), lr=0.1, momentum=0.9, weight_decay=5e-4)
    outer = torch.optim.Adam(metapeft.meta_parameters(model), lr=0.05)
    gamma_start = (model.good.gamma.item(), model.bad.gamma.item())
    fixed_train, fixed_meta = draw(train_set, 64), draw(meta_set, 64)
    first = hypergradient(model, classification_loss, fixed_train, fixed_meta, lr=0.1, mode=mode)
    with torch.no_grad():
        for p, g in zip(metapeft.meta_parameters(model), first.meta_grads):
            p.sub_(0.5 * g)
    stepped = hypergradient(model, classification_loss, fixed_train, fixed_meta, lr=0.1, mode="first_order")
    assert stepped.val_loss < first.val_loss, "a small step along -hypergradient must lower the look-ahead loss"
    for _ in range(40):
        buffers = [inner.state[p].get("momentum_buffer") for p in trainable_phi(model)]
        result = hypergradient(model, classification_loss, draw(train_set, 64), draw(meta_set, 64), lr=0.1,
                               momentum=0.9, momentum_buffers=buffers, weight_decay=5e-4, mode=mode)
        for p, g in zip(metapeft.meta_parameters(model), result.meta_grads):
            p.grad = g
        outer.step()
        for p, g in zip(trainable_phi(model), result.phi_grads):
            p.grad = g
        inner.step()
    last = hypergradient(model, classification_loss, fixed_train, fixed_meta, lr=0.1, mode=mode)
    assert last.val_loss < 0.8 * first.val_loss
    assert model.bad.gamma.item() < 0.5 * gamma_start[1], "the harmful position's gamma must fall"
    assert model.good.gamma.item() > gamma_start[0], "the helpful position's gamma must not fall"


@pytest.mark.parametrize("steps", [1, 2], ids=lambda k: f"K{k}")
@pytest.mark.parametrize("kind", ["lora", "adapters"])
@pytest.mark.parametrize("gamma", ["scalar", "channel"])
def test_module_learning_rates_match_brute_force(kind, steps, gamma):
    """phi_{k+1} = phi_k - lr * gamma_module * (g + wd phi + mu m): every mode against torch.func through the same
    unrolled steps with gamma differentiated in the step size too; first_order keeps the learning-rate term."""
    from metapeft.params import module_lr_scales
    from metapeft.reference import brute_force_hypergradient

    torch.manual_seed(3)
    model = lora_mlp(3, gamma=gamma) if kind == "lora" else adapter_net(gamma)
    train, val = batches("mlp")
    more = more_train_batches(steps)
    buffers = momentum_buffers(model)
    kwargs = {"lr": LR, "momentum": MOMENTUM, "momentum_buffers": buffers, "weight_decay": WEIGHT_DECAY,
              "lookahead_batches": more}
    oracle = {order: brute_force_hypergradient(model, classification_loss, train, val, first_order=order,
                                               lr_scales=independent_lr_scales(model), **kwargs)
              for order in (False, True)}
    plain = brute_force_hypergradient(model, classification_loss, train, val, first_order=True, **kwargs)
    assert relative_error(oracle[True].meta_grads, plain.meta_grads) > 1e-3, "the learning-rate term must matter"
    for mode, expected, tolerance in (("exact", oracle[False], 1e-8), ("finite_difference", oracle[False], 1e-3),
                                      ("first_order", oracle[True], 1e-10)):
        result = hypergradient(model, classification_loss, train, val, mode=mode,
                               lr_scales=module_lr_scales(model, trainable_phi(model)), **kwargs)
        assert relative_error(result.meta_grads, expected.meta_grads) < tolerance, mode
        assert relative_error(result.lookahead, expected.lookahead) < 1e-12, mode


def test_lr_scales_are_checked():
    model = lora_mlp(1)
    train, val = batches("mlp")
    phi = trainable_phi(model)
    with pytest.raises(ValueError, match="one entry"):
        hypergradient(model, classification_loss, train, val, lr=LR, lr_scales=[None])
    bad = [None] * len(phi)
    bad[0] = torch.ones(7, 7, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"lr_scales\[0\]"):
        hypergradient(model, classification_loss, train, val, lr=LR, lr_scales=bad)
