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
    assert set(out) == {"acc_aligned", "acc_bias1"}
