"""Classification metrics for long-tailed data: overall / class-mean / group accuracy and macro-F1.

Everything derives from a confusion matrix ``cm`` (C, C) with ``cm[true, predicted]`` counts, so
distributed evaluation only has to sum matrices across ranks.

Classes absent from the evaluated data (no true sample) are handled explicitly:
- class-mean and group accuracy average only the classes present in the data; a group with no present
  class reports ``None``; ``absent_classes`` lists the absent ones;
- macro-F1 averages ``F1_c = 2 TP / (2 TP + FP + FN)`` over the classes that occur as a target or as a
  prediction (scikit-learn's ``f1_score(average="macro")`` convention): an absent class that is
  predicted anyway counts with F1 = 0, one never predicted is left out.
"""

from __future__ import annotations

import torch

# Column order of the standard groups in :func:`metrics_table`; other groups follow alphabetically.
GROUP_ORDER = ("many", "medium", "few", "head", "tail")


def confusion_matrix(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) int64 counts, ``[true, predicted]``; predictions and targets: (n,) ints in ``[0, num_classes)``."""
    predictions, targets = torch.as_tensor(predictions).long().flatten(), torch.as_tensor(targets).long().flatten()
    if predictions.shape != targets.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)} differ in size")
    for name, values in (("predictions", predictions), ("targets", targets)):
        if values.numel() and (int(values.min()) < 0 or int(values.max()) >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes}), got range "
                             f"[{int(values.min())}, {int(values.max())}]")
    flat = targets.cpu() * num_classes + predictions.cpu()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def class_split_from_counts(train_counts, many: int = 100, few: int = 20) -> dict[str, list[int]]:
    """The natural long-tailed split: many > ``many`` training images, few < ``few``, medium in between."""
    counts = [int(c) for c in train_counts]
    return {
        "many": [c for c, n in enumerate(counts) if n > many],
        "medium": [c for c, n in enumerate(counts) if few <= n <= many],
        "few": [c for c, n in enumerate(counts) if n < few],
    }


def metrics_from_confusion(cm: torch.Tensor, class_split: dict[str, list[int]] | None = None) -> dict:
    """Metrics of a confusion matrix ``cm`` (C, C) ``[true, predicted]``.

    ``class_split`` maps group names (``many``/``medium``/``few`` or ``head``/``tail``) to class indices.
    Returns ``{"accuracy", "class_mean_accuracy", "macro_f1", "<group>_accuracy" per group, "per_class_accuracy"
    (list, None for absent classes), "absent_classes", "num_samples"}``; accuracies are fractions in [0, 1].
    """
    cm = torch.as_tensor(cm).double()
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"cm must be a square (C, C) matrix, got {tuple(cm.shape)}")
    num_classes = cm.shape[0]
    support, predicted, correct = cm.sum(1), cm.sum(0), cm.diagonal()
    total = float(support.sum())
    present = support > 0
    recall = torch.where(present, correct / support.clamp_min(1), torch.nan)
    f1_denominator = 2 * correct + (predicted - correct) + (support - correct)
    occurring = f1_denominator > 0
    f1 = 2 * correct[occurring] / f1_denominator[occurring]
    result = {
        "accuracy": float(correct.sum() / total) if total else None,
        "class_mean_accuracy": float(recall[present].mean()) if bool(present.any()) else None,
        "macro_f1": float(f1.mean()) if f1.numel() else None,
    }
    for group, classes in (class_split or {}).items():
        classes = list(classes)
        if any(not 0 <= c < num_classes for c in classes):
            raise ValueError(f"class_split[{group!r}] has a class outside [0, {num_classes}): {classes}")
        values = [float(recall[c]) for c in classes if bool(present[c])]
        result[f"{group}_accuracy"] = sum(values) / len(values) if values else None
    result["per_class_accuracy"] = [float(r) if bool(p) else None for r, p in zip(recall, present)]
    result["absent_classes"] = [c for c in range(num_classes) if not bool(present[c])]
    result["num_samples"] = int(total)
    return result


def evaluate(predictions, targets, num_classes: int, class_split: dict[str, list[int]] | None = None) -> dict:
    """Metrics (see :func:`metrics_from_confusion`) of ``predictions`` (n,) against ``targets`` (n,), ints in
    ``[0, num_classes)``."""
    return metrics_from_confusion(confusion_matrix(predictions, targets, num_classes), class_split)


def chance_metrics(targets, num_classes: int, class_split: dict[str, list[int]] | None = None) -> dict:
    """The expected metrics (see :func:`metrics_from_confusion`) of a uniformly random prediction over
    ``num_classes`` classes on ``targets`` (n,): every accuracy 1 / num_classes, macro-F1 from the expected
    confusion matrix ``support_t / num_classes`` in every column. What a diverged run is scored as."""
    support = torch.bincount(torch.as_tensor(targets).long(), minlength=num_classes).double()
    return metrics_from_confusion(support[:, None].expand(-1, num_classes) / num_classes, class_split)


def format_percent(value: float | None) -> str:
    """A fraction in [0, 1] as a percentage with one decimal (``0.527 -> "52.7"``); ``None`` (an empty group) as
    ``"-"``."""
    return "-" if value is None else f"{100 * value:.1f}"


def metrics_table(rows: dict[str, dict]) -> str:
    """The paper-style Markdown table: one row per named metrics dict (:func:`metrics_from_confusion`), columns
    overall, class-mean, each group present in any row (many / medium / few or head / tail first, then others
    alphabetically), macro-F1; percentages with one decimal."""
    groups = [g for g in GROUP_ORDER if any(f"{g}_accuracy" in m for m in rows.values())]
    groups += sorted({k.removesuffix("_accuracy") for m in rows.values() for k, v in m.items()
                      if k.endswith("_accuracy") and (v is None or isinstance(v, float))} - {"class_mean", *groups})
    header = ["method", "overall", "class-mean", *groups, "macro-F1"]
    body = [[name, format_percent(m.get("accuracy")), format_percent(m.get("class_mean_accuracy")),
             *(format_percent(m.get(f"{g}_accuracy")) for g in groups), format_percent(m.get("macro_f1"))]
            for name, m in rows.items()]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = (c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in body)])
