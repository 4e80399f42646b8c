"""Logit-adjusted loss and the cosine classifier head against hand computations."""

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from metapeft.heads import CosineClassifier, find_head, head_in_features, replace_head
from metapeft.losses import LogitAdjustedLoss, class_log_prior


def test_logit_adjusted_loss_matches_hand_computation():
    counts = [6, 3, 1]
    logits = torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    targets = torch.tensor([2, 0])
    loss = LogitAdjustedLoss(counts, tau=1.0).double()(logits, targets)
    prior = [6 / 10, 3 / 10, 1 / 10]
    expected = 0.0
    for row, t in zip(logits.tolist(), targets.tolist()):
        adjusted = [z + math.log(p) for z, p in zip(row, prior)]
        expected += -(adjusted[t] - math.log(sum(math.exp(a) for a in adjusted))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_tau_zero_is_cross_entropy_and_absent_class_stays_finite():
    logits, targets = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1])
    assert torch.allclose(LogitAdjustedLoss([4, 2, 0], tau=0.0)(logits, targets), F.cross_entropy(logits, targets))
    assert torch.isfinite(class_log_prior([4, 2, 0])).all()
    assert class_log_prior([4, 2, 0])[2] == class_log_prior([4, 2, 1])[2]


def test_loss_errors_name_the_argument():
    with pytest.raises(ValueError, match="logits"):
        LogitAdjustedLoss([1, 2])(torch.randn(3, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="class_counts"):
        LogitAdjustedLoss([1, -2])
    with pytest.raises(ValueError, match="tau"):
        LogitAdjustedLoss([1, 2], tau=-1.0)


def test_cosine_classifier_is_scaled_cosine_similarity():
    head = CosineClassifier(4, 3, scale=25.0).double()
    features = torch.randn(5, 4, dtype=torch.float64)
    expected = torch.tensor([[25.0 * float(torch.dot(f, w) / (f.norm() * w.norm())) for w in head.weight.detach()]
                             for f in features], dtype=torch.float64)
    assert torch.allclose(head(features), expected, rtol=1e-12, atol=1e-12)
    assert head(features * 7.0).sub(head(features)).abs().max() < 1e-12


def test_cosine_init_from_class_means_keeps_absent_classes():
    head = CosineClassifier(3, 3)
    before = head.weight.detach().clone()
    features = torch.tensor([[1.0, 0, 0], [3.0, 2, 0], [0, 0, 5.0]])
    labels = torch.tensor([0, 0, 2])
    sums = torch.zeros(3, 3).index_add_(0, labels, features)
    head.init_from_class_means(sums, torch.bincount(labels, minlength=3))
    assert torch.allclose(head.weight[0], F.normalize(torch.tensor([2.0, 1.0, 0.0]), dim=0))
    assert torch.allclose(head.weight[2], torch.tensor([0.0, 0.0, 1.0]))
    assert torch.equal(head.weight[1], before[1])
    with pytest.raises(ValueError, match="feature_sums"):
        head.init_from_class_means(torch.zeros(2, 3), torch.zeros(3))


def test_find_and_replace_head_on_timm_and_plain_models():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                            num_classes=5)
    assert find_head(vit) == "head" and head_in_features(vit, vit.head) == 192
    replace_head(vit, "head", CosineClassifier(192, 5))
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 5) and isinstance(vit.get_classifier(), CosineClassifier)
    nested = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), nn.Linear(4, 2)))
    assert find_head(nested, "1.1") == "1.1"
    replace_head(nested, "1.1", CosineClassifier(4, 3))
    assert nested(torch.randn(2, 4)).shape == (2, 3)
    with pytest.raises(ValueError, match="head"):
        find_head(nested)
    with pytest.raises(ValueError, match="not a submodule"):
        find_head(nested, "2")
