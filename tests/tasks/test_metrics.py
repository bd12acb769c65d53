from __future__ import annotations

import pytest
import torch

from cdistill.tasks.metrics import BiasGroupAccuracy


def test_bias_group_accuracy_by_hand() -> None:
    m = BiasGroupAccuracy(num_groups=3)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    bias = torch.tensor([0, 1, 0, 2, -1, 2])  # aligned: 0,1,5; conflicting: 2,3; none: 4
    preds = torch.tensor([0, 0, 2, 1, 1, 2])  # correct: 0,2,4,5
    m.update(preds, labels, bias)
    out = m.compute()
    assert out["acc_aligned"].item() == pytest.approx(2 / 3)
    assert out["acc_conflicting"].item() == pytest.approx(1 / 2)
    assert out["acc_bias0"].item() == pytest.approx(1.0)  # samples 0 and 2
    assert out["acc_bias1"].item() == pytest.approx(0.0)
    assert out["acc_bias2"].item() == pytest.approx(1 / 2)  # samples 3 and 5


def test_empty_groups_are_left_out() -> None:
    m = BiasGroupAccuracy(num_groups=4)
    m.update(torch.tensor([1]), torch.tensor([1]), torch.tensor([1]))
    out = m.compute()
    assert set(out) == {"acc_aligned", "acc_bias1", "acc_worst_group", "acc_group_mean"}


def test_worst_group_and_group_mean_on_a_planted_case() -> None:
    # Groups (label, bias) with planted accuracies: (0,0) 4/4, (0,1) 1/4, (1,1) 3/4, (1,0) 2/2;
    # two samples with bias -1 (unknown) are wrong and must count in no group.
    m = BiasGroupAccuracy(num_groups=2, num_classes=2)
    plan = [((0, 0), 4, 4), ((0, 1), 4, 1), ((1, 1), 4, 3), ((1, 0), 2, 2)]
    labels, bias, preds = [], [], []
    for (y, b), n, hits in plan:
        labels += [y] * n
        bias += [b] * n
        preds += [y] * hits + [1 - y] * (n - hits)
    labels += [0, 1]
    bias += [-1, -1]
    preds += [1, 0]
    m.update(torch.tensor(preds[:7]), torch.tensor(labels[:7]), torch.tensor(bias[:7]))  # two batches
    m.update(torch.tensor(preds[7:]), torch.tensor(labels[7:]), torch.tensor(bias[7:]))
    out = m.compute()
    assert out["acc_worst_group"].item() == pytest.approx(1 / 4)
    assert out["acc_group_mean"].item() == pytest.approx((1 + 1 / 4 + 3 / 4 + 1) / 4)


def test_group_metrics_use_labels_beyond_the_bias_values() -> None:
    # 3 classes, 2 bias values: group (2, 1) exists and is the worst; an empty group is skipped.
    m = BiasGroupAccuracy(num_groups=2, num_classes=3)
    m.update(torch.tensor([0, 1, 0]), torch.tensor([0, 2, 2]), torch.tensor([0, 1, 1]))
    out = m.compute()
    assert out["acc_worst_group"].item() == 0.0
    assert out["acc_group_mean"].item() == pytest.approx(0.5)


def test_no_group_metrics_when_every_bias_is_unknown() -> None:
    m = BiasGroupAccuracy(num_groups=2, num_classes=2)
    m.update(torch.tensor([0, 1]), torch.tensor([0, 0]), torch.tensor([-1, -1]))
    assert "acc_worst_group" not in m.compute()
