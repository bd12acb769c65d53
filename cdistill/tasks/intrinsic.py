"""IntrinsicModule: intrinsic image decomposition (``I ≈ R * S``) with an optional concept loss.

``L = si-MSE(R) + si-MSE(S) + λ_c Σ_t w_t L_c,t`` (means over the batch).

A reconstruction task has no classes, hence no class prototypes: the concept loss uses as
its gradient direction ``g = ∇_a L_branch``, the gradient of the branch's per-sample
scale-invariant reconstruction loss w.r.t. the activation ``a`` of a layer *inside that
branch* (``model.target=loss``). ``output`` uses ``∇_a ½||branch output||²`` instead (no
ground truth needed), and ``random`` uses ``∇_a <u, branch output>`` for a fresh Gaussian
image ``u`` per sample and step: ``J^T u`` for the branch Jacobian ``J``, whose cosine with
``v`` is small on average over ``u`` only when ``J v`` is small, i.e. when the branch *output*
does not move along the concept (the analogue of the ``random`` logit target of
:class:`~cdistill.tasks.distill.ConceptDistillModule`; the loss gradient vanishes at a good fit
and then carries little signal). It is one batched double backward (the net has no batch norm, so
the gradient of the batch sum is every sample's own gradient). A desensitize term
penalises ``|cos(g, v)|``: moving the activation along the concept direction ``v`` should
not change the branch's loss.

CAVs come from concept pairs rendered from the same geometry (see
:func:`datamodules.intrinsic_synth.concept_pairs`): at the term's layer, the activation
differences ``a(after) - a(before)`` of one set (e.g. ``illumination``: the light moves away
from the training lights) are separated from those of the other (``material``: only the
albedo changes) with :func:`cdistill.concepts.cav.fit_cav`. The ``R`` term makes the reflectance
branch insensitive to illumination change; the optional ``S`` term makes the shading branch
insensitive to material change. CAVs are fitted on the model as it is when training starts
(unless a checkpoint holds them), kept as buffers, and broadcast from rank 0 under DDP.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.image import StructuralSimilarityIndexMeasure

from cdistill.concepts.cav import CAVBank
from cdistill.errors import CdistillError
from cdistill.models.iid_net import create_iid_net
from cdistill.objective.cav_fitter import CAVFitter, difference_rows
from cdistill.objective.config import IID_CAV, ConceptsConfig, term_name
from cdistill.objective.losses import BRANCH_TARGETS, concept_loss, position_gradients
from cdistill.tasks.classifier import EvalSplitsModule, fit_hparams, to_plain
from cdistill.tasks.iid_metrics import lmse, ls_scale, si_mse
from cdistill.utils.artefacts import broadcast_bank, broadcast_buffers
from cdistill.utils.capture import capture, collect_activations, resolve_module
from cdistill.utils.datamodule import ConceptPairData, attached_concept_data

log = logging.getLogger(__name__)
Batch = Mapping[str, Tensor]
BRANCHES = {"r": ("reflectance", 0), "s": ("shading", 1)}
TARGETS = BRANCH_TARGETS
#: Keys every intrinsic concept term names.
TERM_KEYS = ("branch", "layer", "concept", "negative")


class IntrinsicModule(EvalSplitsModule):
    """Predict reflectance and shading; see the module docstring.

    Args:
        lambda_c: Weight of the concept loss (0: off; no CAVs are fitted).
        target: ``loss`` (``∇_a`` of the branch's reconstruction loss), ``output``
            (``∇_a ½||branch output||²``) or ``random`` (``∇_a <u, branch output>``, ``u``
            Gaussian); see the module docstring.
        concepts: :class:`~cdistill.objective.config.ConceptsConfig` as a dict: ``terms`` (each
            names ``branch`` (r|s), ``layer``, ``concept`` and ``negative``, in
            ``illumination``, ``material``), ``num_pairs`` (pairs per concept set; 0: the
            datamodule's) and the CAV keys, with the defaults of
            :data:`~cdistill.objective.config.IID_CAV` (``mean_diff``; a refit replaces the
            CAVs). ``refit_every_n_epochs`` / ``refit_every_n_steps`` refit them on the current
            model (they follow the representation as it trains from scratch; the student quickly
            moves the concept to directions a frozen CAV does not cover). ``cav_mode``
            ``position``: one CAV in the ``C``-dim channel space of the per-position differences
            (at most ``max_rows`` rows), the loss the gradient-norm-weighted cosine at every position.
        lmse_window: LMSE window side (the MIT protocol's 20 suits ~250 px images).
        fit_batch_size: Batch size for collecting activations.
        val_names, test_names: Evaluation split names (the datamodule's win when it has them).
        **fit: ``student`` (keyword arguments of :func:`cdistill.models.iid_net.create_iid_net`:
            ``name``, ``in_chans``, ``width``), ``optimizer`` and the optional ``scheduler``
            (Hydra-style configs), as for every task: see :func:`cdistill.tasks.classifier.fit_hparams`.
    """

    def __init__(
        self,
        lambda_c: float = 0.0,
        target: str = "loss",
        concepts: Mapping[str, Any] | None = None,
        lmse_window: int = 8,
        fit_batch_size: int = 250,
        val_names: Sequence[str] = ("val", "val_relit"),
        test_names: Sequence[str] = ("test", "test_same_light"),
        **fit: Any,
    ) -> None:
        super().__init__()
        concepts = dict(to_plain(concepts) or {})
        if target not in TARGETS:
            raise CdistillError(f"model.target={target!r}: use one of {TARGETS}.")
        self.concepts_cfg = ConceptsConfig.from_dict(concepts, base=IID_CAV, required=TERM_KEYS)
        if lambda_c > 0 and not self.concepts_cfg.terms:
            raise CdistillError("model.lambda_c > 0 but model.concepts.terms is empty: name at least one term.")
        self.save_hyperparameters({
            **fit_hparams(**fit), "lambda_c": lambda_c, "target": target, "concepts": concepts,
            "lmse_window": lmse_window, "fit_batch_size": fit_batch_size,
            "val_names": list(val_names), "test_names": list(test_names),
        })
        self.student = create_iid_net(**self.hparams["student"])
        for t in self.concepts_cfg.terms:
            if t.branch not in BRANCHES:
                raise CdistillError(f"Concept term {t.to_dict()}: branch must be one of {sorted(BRANCHES)}.")
            resolve_module(self.student, str(t.layer))  # a wrong layer fails now, listing close names
        terms = self.concepts_cfg.terms
        self.terms = [t.to_dict() for t in terms]
        self.cav_fitter = CAVFitter(self.concepts_cfg.cav, terms)
        self.cavs = CAVBank()
        self.register_buffer("cav_rows", torch.full((len(terms),), -1, dtype=torch.long))
        self.register_buffer("term_weights", torch.tensor([float(t.weight) for t in terms]))
        self.register_buffer("sensitize", torch.tensor([t.direction == "sensitize" for t in terms], dtype=torch.bool))
        self.register_buffer("artefacts_fitted", torch.tensor(False))
        self.eval_metrics = nn.ModuleDict()
        self._build_eval_metrics([*val_names, *test_names])
        self.run_config: str | None = None  # the resolved Hydra config, stored in checkpoints

    cav_rows: Tensor
    term_weights: Tensor
    sensitize: Tensor
    artefacts_fitted: Tensor

    # ------------------------------------------------------------------ concept artefacts
    @property
    def cav_mode(self) -> str:
        return self.concepts_cfg.cav.cav_mode

    def _activation_differences(self, pairs: Mapping[str, tuple[Tensor, Tensor]], layer: str) -> dict[str, Tensor]:
        """``{set: a(after) - a(before)}`` at ``layer`` as CAV rows (see
        :func:`cdistill.objective.cav_fitter.difference_rows`)."""
        bs = int(self.hparams["fit_batch_size"])
        out = {}
        for i, (name, (before, after)) in enumerate(pairs.items()):
            acts = [
                collect_activations(self.student, layer, [x[j : j + bs] for j in range(0, len(x), bs)],
                                    flatten=self.cav_mode != "position")
                for x in (before, after)
            ]
            out[name] = difference_rows(acts[1] - acts[0], self.concepts_cfg.cav, seed=i)
        return out

    def fit_cavs(self, pairs: Mapping[str, tuple[Tensor, Tensor]]) -> tuple[CAVBank, Tensor]:
        """One CAV per term (concept-set differences vs negative-set differences at its layer).

        Returns:
            The bank and ``cav_rows [T]`` (the bank row of each term; -1 below the gate).
        """
        bank, index = self.cav_fitter.fit(lambda layer: self._activation_differences(pairs, layer))
        return bank, index[:, 0].to(self.cav_rows.device)

    def _concept_pairs(self, datamodule: ConceptPairData) -> dict[str, tuple[Tensor, Tensor]]:
        n = self.concepts_cfg.num_pairs or None
        return {k: (a.to(self.device), b.to(self.device)) for k, (a, b) in datamodule.concept_pairs(n).items()}

    def _set_cavs(self, bank: CAVBank, rows: Tensor) -> None:
        """Adopt ``bank`` and ``rows``, then give every rank rank 0's values."""
        self.cavs, self.cav_rows = bank.to(self.device), rows.to(self.device)
        log.info("fitted %d IID CAVs: accuracies %s", len(bank), [round(float(a), 3) for a in bank.accuracies])
        broadcast_bank(self._trainer, self.cavs, self.device)
        broadcast_buffers(self._trainer, [(self, "cav_rows")], self.device)
        self.artefacts_fitted = torch.tensor(True, device=self.device)

    def fit_artefacts(self, datamodule: ConceptPairData) -> None:
        """Fit the CAVs on the current model, then give every rank rank 0's values."""
        self._set_cavs(*self.fit_cavs(self._concept_pairs(datamodule)))

    def on_fit_start(self) -> None:
        # CAVs restored from a checkpoint are kept: resuming must not refit them.
        if self.hparams["lambda_c"] > 0 and not bool(self.artefacts_fitted):
            self.fit_artefacts(attached_concept_data(self.trainer, self))

    def refit(self) -> None:
        """Refit the CAVs on the current model (they replace the running ones, see
        :meth:`cdistill.objective.cav_fitter.CAVFitter.refresh`); when every CAV falls below the
        gate, keep the previous ones (warned) rather than stop training. Every rank holds the
        same weights and renders the same pairs, so all ranks take the same branch."""
        dm = attached_concept_data(self.trainer, self)
        bank, rows = self.cav_fitter.refresh(
            self.cavs, self.cav_rows, lambda: self.fit_cavs(self._concept_pairs(dm)), when=f"at step {self.global_step}"
        )
        if bank is not self.cavs:
            self._set_cavs(bank, rows)

    def on_train_epoch_start(self) -> None:
        if self.hparams["lambda_c"] > 0 and self.concepts_cfg.cav.refresh.epoch_due(self.current_epoch):
            self.refit()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.hparams["lambda_c"] > 0 and self.concepts_cfg.cav.refresh.step_due(self.global_step):
            self.refit()

    # ------------------------------------------------------------------ objective
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(R [B, 3, H, W], S [B, 3, H, W])`` for images ``[B, 3, H, W]``."""
        return self.student(x)

    def _branch_scalar(self, pred: Tensor, per_sample_loss: Tensor) -> Tensor:
        """The scalar whose gradient the concept loss aligns: summed over the batch."""
        target = self.hparams["target"]
        if target == "output":
            return 0.5 * pred.pow(2).sum()
        if target == "random":
            # From the module's generator, whose state checkpoints carry (exact resume).
            u = torch.randn(pred.shape, generator=self.rng, dtype=pred.dtype).to(pred.device)
            return (u * pred).sum()
        return per_sample_loss.sum()

    def compute_losses(self, batch: Batch) -> dict[str, Tensor]:
        """``loss`` and each term: ``task``, ``r_mse``, ``s_mse`` (scale-invariant, batch
        means), ``concept`` and ``concept/<term>`` (when ``lambda_c > 0``), plus the outputs
        ``R`` and ``S``. Callable without a Trainer once the CAVs are fitted."""
        hp = self.hparams
        layers = sorted({str(t["layer"]) for t in self.terms}) if hp["lambda_c"] > 0 else []
        mask = batch.get("mask")
        with capture(self.student, layers) as store:
            r, s = self.student(batch["image"])
        per = {"r": si_mse(r, batch["reflectance"], mask), "s": si_mse(s, batch["shading"], mask)}
        task = per["r"].mean() + per["s"].mean()
        out: dict[str, Tensor] = {"task": task, "r_mse": per["r"].mean(), "s_mse": per["s"].mean(), "R": r, "S": s}
        loss = task
        if hp["lambda_c"] > 0:
            preds = {"r": r, "s": s}
            total = task.new_zeros(())
            for t, term in enumerate(self.terms):
                row = self.cav_rows[t : t + 1]
                if int(row) < 0:
                    continue
                acts = store[str(term["layer"])]
                scalar = self._branch_scalar(preds[term["branch"]], per[term["branch"]])
                (grad,) = torch.autograd.grad(scalar, acts, create_graph=True)
                labels = torch.zeros(len(grad), dtype=torch.long, device=grad.device)  # one "class"
                g = position_gradients(grad.flatten(1), tuple(grad.shape[1:])) if self.cav_mode == "position" else grad.flatten(1)
                lc, _ = concept_loss(g, labels, self.cavs.vectors, row.view(1, 1),
                                     self.sensitize[t : t + 1], self.term_weights[t : t + 1])
                out[f"concept/{term_name(term)}"] = lc / self.term_weights[t].clamp_min(1e-12)
                total = total + lc
            out["concept"] = total
            loss = loss + hp["lambda_c"] * total
        out["loss"] = loss
        return out

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor | None:
        out = self.compute_losses(batch)
        if not bool(torch.isfinite(out["loss"].detach())):
            self.nonfinite_batch("the loss is not finite", batch, batch_idx)
            return None
        bs = batch["image"].shape[0]
        for key, value in out.items():
            if key not in ("R", "S"):
                self.log(f"train/{key}", value.detach(), on_step=True, on_epoch=True, batch_size=bs,
                         prog_bar=key == "loss")
        return out["loss"]

    # ------------------------------------------------------------------ evaluation
    def _build_eval_metrics(self, names: Sequence[str]) -> None:
        for name in names:
            if name not in self.eval_metrics:
                metrics: dict[str, Any] = {f"{b}_{m}": MeanMetric() for b in BRANCHES for m in ("mse", "lmse")}
                metrics.update({f"{b}_ssim": StructuralSimilarityIndexMeasure(data_range=1.0) for b in BRANCHES})
                self.eval_metrics[name] = MetricCollection(metrics, compute_groups=False)

    def _eval_step(self, batch: Batch, names: Sequence[str], idx: int) -> None:
        metrics = self.eval_metrics[names[idx]]
        assert isinstance(metrics, MetricCollection)
        preds = self.student(batch["image"])
        mask = batch.get("mask")
        window = min(int(self.hparams["lmse_window"]), *batch["image"].shape[-2:])
        for b, (key, i) in BRANCHES.items():
            pred, gt = preds[i], batch[key]
            metrics[f"{b}_mse"].update(si_mse(pred, gt, mask))
            metrics[f"{b}_lmse"].update(lmse(pred, gt, mask, window))
            # SSIM of the least-squares-scaled prediction: scale-invariant like the others.
            metrics[f"{b}_ssim"].update((ls_scale(pred, gt, mask) * pred).clamp(0, 1), gt)

    def _eval_epoch_end(self, names: Sequence[str]) -> None:
        for name in names:
            metrics = self.eval_metrics[name]
            assert isinstance(metrics, MetricCollection)
            if not metrics["r_mse"].update_called:
                continue
            values = metrics.compute()
            self.log_dict({f"{name}/{k}": v for k, v in values.items()}, sync_dist=False)
            metrics.reset()
