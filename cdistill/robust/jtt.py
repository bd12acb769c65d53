"""JTT's first stage (Liu et al. 2021): train an ERM identification model for ``T`` epochs and
take its training errors. Free of Lightning, so a test can check the error set against the
model that produced it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from cdistill.utils.capture import eval_mode

Batch = Mapping[str, Tensor]


def train_identification(
    model: nn.Module,
    dataset: Dataset[Any],
    optimizer: torch.optim.Optimizer,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
    max_batches: int | None = None,
) -> None:
    """Plain cross-entropy training of ``model`` in place, in an order drawn from ``generator``
    (a fresh permutation per epoch), so the result is a pure function of the generator's state.

    Args:
        max_batches: At most this many batches per epoch (``fast_dev_run`` / limits); None: all.
    """
    n = len(dataset)  # type: ignore[arg-type]
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).tolist()
        loader = DataLoader(dataset, batch_size=batch_size, sampler=order)
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            optimizer.zero_grad()
            loss = F.cross_entropy(model(batch["image"].to(device)), batch["label"].to(device))
            loss.backward()
            optimizer.step()


@torch.no_grad()
def predictions(model: nn.Module, batches: Iterable[Batch], device: torch.device) -> tuple[Tensor, Tensor]:
    """``(index, predicted class)``, each ``int64 [N]``, of ``model`` in eval mode over ``batches``
    (each with ``image`` and ``index``)."""
    idx, preds = [], []
    with eval_mode(model):
        for batch in batches:
            preds.append(model(batch["image"].to(device)).argmax(1).cpu())
            idx.append(batch["index"].cpu())
    return torch.cat(idx), torch.cat(preds)


def error_mask(model: nn.Module, dataset: Dataset[Any], batch_size: int, device: torch.device) -> Tensor:
    """``bool [N]``: which samples of ``dataset`` ``model`` misclassifies (eval mode, every sample)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    index, preds = predictions(model, loader, device)
    labels = torch.as_tensor(getattr(dataset, "labels"))[index]  # noqa: B009 - every cdistill dataset has them
    mask = torch.zeros(len(dataset), dtype=torch.bool)  # type: ignore[arg-type]
    mask[index] = preds != labels
    return mask
