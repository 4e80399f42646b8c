"""metapeft.metrics against hand-computed values and scikit-learn, including absent classes; the table."""

import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score

from metapeft.metrics import class_split_from_counts, confusion_matrix, evaluate, metrics_table


def test_hand_computed_metrics_with_an_absent_class():
    # class 3 never occurs as a target but is predicted once
    targets = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    predictions = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3])
    result = evaluate(predictions, targets, num_classes=4,
                      class_split={"many": [0], "medium": [1], "few": [2, 3], "unseen": [3]})
    assert result["accuracy"] == pytest.approx(5 / 8)
    assert result["per_class_accuracy"][:3] == pytest.approx([0.75, 0.5, 0.5])
    assert result["per_class_accuracy"][3] is None
    assert result["class_mean_accuracy"] == pytest.approx((0.75 + 0.5 + 0.5) / 3)
    assert result["many_accuracy"] == pytest.approx(0.75)
    assert result["medium_accuracy"] == pytest.approx(0.5)
    assert result["few_accuracy"] == pytest.approx(0.5)  # class 3 absent: only class 2 counts
    assert result["unseen_accuracy"] is None
    assert result["absent_classes"] == [3] and result["num_samples"] == 8
    # F1: class0 2*3/(6+0+1)=6/7; class1 2*1/(2+1+1)=1/2; class2 2*1/(2+1+1)=1/2; class3 predicted once -> 0
    assert result["macro_f1"] == pytest.approx((6 / 7 + 0.5 + 0.5 + 0.0) / 4)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_agrees_with_scikit_learn_on_random_labels():
    g = torch.Generator().manual_seed(3)
    targets = torch.randint(0, 6, (300,), generator=g)
    targets[targets == 4] = 5  # class 4 absent from the targets
    predictions = torch.where(torch.rand(300, generator=g) < 0.6, targets, torch.randint(0, 7, (300,), generator=g))
    result = evaluate(predictions, targets, num_classes=7)
    assert result["macro_f1"] == pytest.approx(f1_score(targets, predictions, average="macro"), rel=1e-12)
    assert result["class_mean_accuracy"] == pytest.approx(balanced_accuracy_score(targets, predictions), rel=1e-12)
    assert result["accuracy"] == pytest.approx(float((predictions == targets).double().mean()), rel=1e-12)


def test_confusion_matrix_layout_and_errors():
    cm = confusion_matrix(torch.tensor([1, 1, 0]), torch.tensor([0, 1, 1]), 2)
    assert cm.tolist() == [[0, 1], [1, 1]]  # [true, predicted]
    with pytest.raises(ValueError, match="targets"):
        confusion_matrix(torch.tensor([0]), torch.tensor([2]), 2)
    with pytest.raises(ValueError, match="size"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0]), 2)
    with pytest.raises(ValueError, match="class_split"):
        evaluate(torch.tensor([0]), torch.tensor([0]), 2, class_split={"few": [5]})
    empty = evaluate(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long), 2)
    assert empty["accuracy"] is None and empty["class_mean_accuracy"] is None and empty["macro_f1"] is None


def test_natural_long_tail_split_thresholds():
    split = class_split_from_counts([500, 101, 100, 20, 19, 0])
    assert split == {"many": [0, 1], "medium": [2, 3], "few": [4, 5]}


def test_metrics_table_format():
    rows = {"LoRA": {"accuracy": 0.5, "class_mean_accuracy": 0.25, "many_accuracy": 1.0, "medium_accuracy": None,
                     "few_accuracy": 0.125, "macro_f1": 0.3333, "per_class_accuracy": [1.0, 0.0]},
            "LoRA + MetaPEFT": {"accuracy": 0.75, "class_mean_accuracy": 0.5, "many_accuracy": 1.0,
                                "medium_accuracy": 0.5, "few_accuracy": 0.0, "macro_f1": 0.5}}
    assert metrics_table(rows).splitlines() == [
        "| method          | overall | class-mean |  many | medium |  few | macro-F1 |",
        "|-----------------|--------:|-----------:|------:|-------:|-----:|---------:|",
        "| LoRA            |    50.0 |       25.0 | 100.0 |      - | 12.5 |     33.3 |",
        "| LoRA + MetaPEFT |    75.0 |       50.0 | 100.0 |   50.0 |  0.0 |     50.0 |",
    ]
