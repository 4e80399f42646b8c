"""``metapeft.meta.optim``: the outer optimizers, the inner SGD with module learning rates, the common-scale
warm-up, each against its formula written out here."""

from __future__ import annotations

import math

import pytest
import torch

from metapeft.meta.optim import CommonScaleCalibration, ModuleLRSGD, SharedAdam, meta_optimizer
from metapeft.modulator import gamma_from_modulator, log_gamma_gradient, modulator_from_gamma


def test_shared_adam_follows_its_formula():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, dtype=torch.float64)), torch.nn.Parameter(torch.randn(2, 2).double())]
    expected = [p.detach().clone() for p in params]
    optimizer = SharedAdam(params, lr=0.1, betas=(0.8, 0.9), eps=1e-8)
    m, v = [torch.zeros_like(p) for p in expected], 0.0
    for t in range(1, 4):
        grads = [torch.randn_like(p) for p in expected]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()
        v = 0.9 * v + 0.1 * float(sum(g.square().sum() for g in grads) / 7)
        for i, g in enumerate(grads):
            m[i] = 0.8 * m[i] + 0.2 * g
            expected[i] = expected[i] - 0.1 * (m[i] / (1 - 0.8 ** t)) / (math.sqrt(v / (1 - 0.9 ** t)) + 1e-8)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e)


def test_shared_adam_keeps_the_direction_adam_does_not():
    params = [torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))]
    for name, equal in (("adam", True), ("shared_adam", False)):
        p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
        optimizer = meta_optimizer(name, [p], 0.1)
        p.grad = torch.tensor([1.0, 0.01], dtype=torch.float64)
        optimizer.step()
        assert (abs(p[0] - p[1]) < 1e-6) == equal, name
    with pytest.raises(ValueError, match="meta_optimizer"):
        meta_optimizer("lion", params, 0.1)


def test_module_lr_sgd_is_torch_sgd_without_scales_and_the_formula_with():
    torch.manual_seed(1)
    start = [torch.randn(4, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)]
    grads = [[torch.randn_like(s) for s in start] for _ in range(3)]
    ours = [torch.nn.Parameter(s.clone()) for s in start]
    torchs = [torch.nn.Parameter(s.clone()) for s in start]
    kwargs = {"lr": 0.2, "momentum": 0.9, "weight_decay": 0.01}
    a, b = ModuleLRSGD(ours, **kwargs), torch.optim.SGD(torchs, **kwargs)
    for step in grads:
        for p, q, g in zip(ours, torchs, step):
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    for p, q in zip(ours, torchs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)

    scaled = [torch.nn.Parameter(s.clone()) for s in start]
    scales = [torch.tensor([[0.5], [2.0], [1.0], [0.1]], dtype=torch.float64), None]
    optimizer = ModuleLRSGD(scaled, **kwargs)
    expected, buffers = [s.clone() for s in start], [None, None]
    for step in grads:
        for p, g in zip(scaled, step):
            p.grad = g.clone()
        optimizer.step(lr_scales=scales)
        for i, g in enumerate(step):
            u = g + 0.01 * expected[i]
            buffers[i] = u if buffers[i] is None else 0.9 * buffers[i] + u
            expected[i] = expected[i] - 0.2 * (1.0 if scales[i] is None else scales[i]) * buffers[i]
    for p, e in zip(scaled, expected):
        torch.testing.assert_close(p.detach(), e)
    with pytest.raises(ValueError, match="one entry per parameter"):
        optimizer.step(lr_scales=[None])


@pytest.mark.parametrize("constraint", ("softplus", "exp"))
def test_common_scale_calibration_halves_while_the_step_overshoots_then_once_more(constraint):
    gammas = [torch.tensor([0.5, 2.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)]
    rho = [torch.nn.Parameter(modulator_from_gamma(g, constraint)) for g in gammas]
    calibration = CommonScaleCalibration([(r, constraint) for r in rho], log_step=math.log(2))

    def hypergradient(common: float) -> list[torch.Tensor]:
        """d L / d rho whose d L / d log(gamma) sums to ``common`` (spread evenly over the three entries)."""
        per_log = [torch.full_like(r, common / 3) for r in rho]
        return [pl / log_gamma_gradient(torch.ones_like(r), r.detach(), constraint) for pl, r in zip(per_log, rho)]

    def gamma_factors() -> list[float]:
        return [float(f) for r, g in zip(rho, gammas) for f in gamma_from_modulator(r.detach(), constraint) / g]

    assert not calibration.step([hypergradient(v) for v in (1.0, -1.0, 0.5, -0.4)]), "noise: no move"
    assert not calibration.step([hypergradient(v) for v in (-2.0, -2.2, -1.8, -2.1)]), "never grows"
    assert gamma_factors() == pytest.approx([1.0, 1.0, 1.0])
    assert calibration.step([hypergradient(v) for v in (2.0, 2.2, 1.8, 2.1)]), "overshoots: halve"
    assert gamma_factors() == pytest.approx([0.5, 0.5, 0.5])
    assert not calibration.step([hypergradient(v) for v in (0.3, -0.2, 0.1, -0.4)]), "no longer: once more, stop"
    assert gamma_factors() == pytest.approx([0.25, 0.25, 0.25])
    assert [h["overshoots"] for h in calibration.history] == [False, False, True, False]
    assert calibration.history[-1]["log_scale"] == pytest.approx(-2 * math.log(2))
    with pytest.raises(ValueError, match="at least 2"):
        calibration.step([hypergradient(1.0)])
