"""DFR, Deep Feature Reweighting (Kirichenko et al. 2022), as a classification task.

Training is plain ERM (the base model, validated and selected by the protocols as any
baseline). Before each test, the weights under test (each protocol's selected checkpoint) keep
every parameter but the student's final linear layer, which is retrained by an L2 logistic
regression on frozen features of a group-balanced held-out set drawn from validation data
(:func:`cdistill.robust.last_layer.fit_dfr_head`), its strength chosen on part of that set. The
held-out set is ``model.dfr.splits``, by default the datamodule's random-cue ``val_random``
where it has one (the biased-MNIST families) and ``val`` ∪ ``val_reversed`` otherwise:
``val_reversed`` carries the test split's own cue mapping (colour ``9 - y`` on ColorMNIST), so a
head fitted on it learns that mapping and scores well on that test alone, not on a random cue.
``model.dfr.heldout_size`` caps the held-out set, e.g. to the number of
concept images a concept method is given.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
from torch.utils.data import DataLoader

from cdistill.errors import unknown_name
from cdistill.objective.config import DFRConfig
from cdistill.robust.groups import group_of
from cdistill.robust.last_layer import DFRHead, final_linear, fit_dfr_head
from cdistill.robust.supervision import Supervision
from cdistill.tasks.group_robust import GroupRobustModule
from cdistill.utils.capture import eval_mode
from cdistill.utils.datamodule import attached_data

log = logging.getLogger(__name__)


class DFRModule(GroupRobustModule[DFRConfig]):
    """DFR (see the module docstring; :class:`~cdistill.objective.config.DFRConfig`).

    Logs, with each test, ``test/dfr_l2`` (the chosen strength), ``test/dfr_heldout_size`` and
    ``test/dfr_tune_worst_acc`` (worst-group accuracy of that strength on the scoring part).

    Args:
        dfr: ``DFRConfig`` as a dict.
        **kwargs: :class:`~cdistill.tasks.group_robust.GroupRobustModule` arguments.
    """

    supervision: ClassVar[Supervision] = "val group labels"
    config_class = DFRConfig

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        final_linear(self.student, int(self.hparams["num_classes"]))  # fails now without a head
        self.last_head: DFRHead | None = None
        self._cache: tuple[torch.Tensor, torch.Tensor, DFRHead] | None = None

    @torch.no_grad()
    def heldout_features(self, datasets: list[Any], batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(features [N, d], labels [N], bias [N])`` of the held-out images: the inputs of the
        final linear layer, in eval mode."""
        head = final_linear(self.student, int(self.hparams["num_classes"]))
        feats: list[torch.Tensor] = []
        labels: list[torch.Tensor] = []
        bias: list[torch.Tensor] = []
        handle = head.register_forward_hook(lambda _m, inp, _out: feats.append(inp[0].detach().flatten(1).cpu()))
        try:
            with eval_mode(self.student):
                for dataset in datasets:
                    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
                        self.student(batch["image"].to(self.device))
                        labels.append(batch["label"].cpu())
                        bias.append(batch["bias"].cpu())
        finally:
            handle.remove()
        return torch.cat(feats), torch.cat(labels), torch.cat(bias)

    def retrain_last_layer(self, datasets: list[Any], batch_size: int) -> DFRHead:
        """Replace the final linear layer's weight and bias by DFR's (nothing else changes).

        Args:
            datasets: The held-out splits (their union is the held-out set).
            batch_size: Batch size of the feature pass.
        """
        features, labels, bias = self.heldout_features(datasets, batch_size)
        groups = group_of(labels, bias, int(self.hparams["num_bias_groups"]))
        cached = self._cache
        if cached is not None and torch.equal(cached[0], features) and torch.equal(cached[1], groups):
            head = cached[2]  # the same features (e.g. two protocols testing one epoch): the same fit
        else:
            # Its own generator, seeded from the run's seed: every protocol's retrain (and every
            # rank's) draws the same subsets.
            gen = torch.Generator().manual_seed(torch.initial_seed() % (2**62) + 1)
            head = fit_dfr_head(features, labels, groups, int(self.hparams["num_classes"]), self.method_cfg, gen)
            self._cache = (features, groups, head)
        layer = final_linear(self.student, int(self.hparams["num_classes"]))
        with torch.no_grad():
            layer.weight.copy_(head.weight.to(layer.weight))
            if layer.bias is not None:
                layer.bias.copy_(head.bias.to(layer.bias))
        self.last_head = head
        return head

    def heldout_splits(self, dm: Any) -> list[str]:
        """The held-out splits: ``model.dfr.splits``, else the datamodule's ``heldout_names``
        (random-cue validation images), else ``val`` ∪ ``val_reversed`` (``val`` alone where
        ``val_reversed`` is its conflicting part).

        Raises:
            CdistillError: A configured split that is not one of the datamodule's validation or
                held-out splits (a test split included).
        """
        if self.method_cfg.splits is not None:
            # Validation and held-out splits only: fitting the head on a test split would score it on its own data.
            known = [*dm.val_names, *getattr(dm, "heldout_names", [])]
            for name in self.method_cfg.splits:
                if name not in known:
                    raise unknown_name("model.dfr.splits entry", name, known,
                                       f"Use validation splits of this data: {', '.join(known)}.")
            return list(self.method_cfg.splits)
        if getattr(dm, "heldout_names", None):
            return list(dm.heldout_names)
        if getattr(dm, "val_reversed_in_val", False):
            return ["val"]
        return [n for n in ("val", "val_reversed") if n in dm.val_names]

    def on_test_start(self) -> None:
        dm = attached_data(self.trainer, self)
        names = self.heldout_splits(dm)
        head = self.retrain_last_layer([dm.split(n) for n in names], int(getattr(dm, "eval_batch_size", 256)))
        log.info("DFR: last layer retrained on %d held-out images of %s (L2 %g, worst-group accuracy %.3f on the "
                 "scoring part)", head.heldout_size, " ∪ ".join(names), head.l2, head.tune_worst_acc)

    def _eval_epoch_end(self, names: Any) -> None:
        super()._eval_epoch_end(names)
        if self.trainer.testing and self.last_head is not None:
            h = self.last_head
            self.log_dict({"test/dfr_l2": float(h.l2), "test/dfr_heldout_size": float(h.heldout_size),
                           "test/dfr_tune_worst_acc": float(h.tune_worst_acc)}, sync_dist=False)
