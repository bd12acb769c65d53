"""The concept artefacts of the concept-distillation task, fitted on the student as it is when
training starts (in the pipeline, the biased base model) unless a checkpoint holds them: the
CAV bank at ``layer`` (optionally fitted in a mapped teacher space, docs/methods.md §2.5), the
class prototypes and the erasers. They are buffers: checkpoints carry them, ``.to(device)``
moves them, and under DDP every rank holds the same ones: rank 0's CAVs and erasers are broadcast
after each fit, and the prototype fitter's centres already agree across ranks."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from cdistill.concepts import load_spec, preprocess
from cdistill.concepts.cav import CAVBank
from cdistill.errors import CdistillError
from cdistill.models.students import first_conv
from cdistill.objective.cav_fitter import CAVFitter, concept_rows
from cdistill.objective.prototypes import PrototypeFitter, Prototypes
from cdistill.tasks.erasing import ErasureMixin
from cdistill.teacher.feature_cache import cached_tensors, fingerprint
from cdistill.teacher.stage import map_concept_sets
from cdistill.utils.artefacts import broadcast_bank, broadcast_buffers
from cdistill.utils.capture import capture, collect_activations, eval_mode
from cdistill.utils.datamodule import ImageData

log = logging.getLogger(__name__)

#: Key of the blank reference image among the concept maps (``position`` mode).
BLANK = "__blank__"


class ConceptArtefactsMixin(ErasureMixin):
    """Fitting and broadcasting the artefacts (mixed into the distill task, which sets ``cfg``,
    ``layer``, ``cav_fitter`` and the buffers)."""

    layer: str
    cav_fitter: CAVFitter
    cavs: CAVBank
    prototypes: Prototypes
    cav_index: Tensor
    input_mean: Tensor
    input_std: Tensor
    artefact_metrics: dict[str, float]
    artefacts_fitted: Tensor
    term_weights: Tensor
    sensitize: Tensor
    subspace: Tensor
    subspace_rank: Tensor

    def _register_artefact_buffers(self) -> None:
        """The CAV index, the terms' weights and directions, the pixel statistics and the fitted flag."""
        terms = self.cfg.concepts.terms
        self.register_buffer("cav_index", torch.full((len(terms), self.hparams["num_classes"]), -1, dtype=torch.long))
        self.register_buffer("term_weights", torch.tensor([float(t.weight) for t in terms]))
        self.register_buffer("sensitize", torch.tensor([t.direction == "sensitize" for t in terms], dtype=torch.bool))
        # Derived from the config alone: not persistent, so checkpoints written before these
        # options existed still load strictly.
        self.register_buffer("subspace", torch.tensor([t.subspace for t in terms], dtype=torch.bool), persistent=False)
        self.register_buffer("subspace_rank", torch.tensor([t.rank or 0 for t in terms], dtype=torch.long),
                             persistent=False)
        # Pixel statistics of the datamodule: the local loss needs un-normalised images.
        conv = first_conv(self.student)
        chans = conv.in_channels if conv is not None else 3
        self.register_buffer("input_mean", torch.zeros(chans))
        self.register_buffer("input_std", torch.ones(chans))
        self.register_buffer("artefacts_fitted", torch.tensor(False))

    #: The RR-ClArC term's signal CAVs (``mean_diff``, student space; docs/methods.md §2.11):
    #: the bank, the index buffer ``signal_cav_index [T, C]`` and the fitter exist only when
    #: ``λ_rr > 0`` (``None`` otherwise; set by the task's ``__init__``).
    signal_cavs: CAVBank | None
    signal_fitter: CAVFitter | None
    signal_cav_index: Tensor

    @property
    def needs_cavs(self) -> bool:
        return self.cfg.on("lambda_c")

    @property
    def needs_signal_cavs(self) -> bool:
        return self.cfg.on("lambda_rr")

    @property
    def needs_prototypes(self) -> bool:
        return self.cfg.on("lambda_p") or (self.needs_cavs and self.cfg.form == "prototype")

    @property
    def cav_mode(self) -> str:
        """``flatten`` or ``position`` (see :class:`~cdistill.objective.config.CAVConfig`)."""
        return self.cfg.concepts.cav.cav_mode

    def _loader(self, images: Tensor) -> list[Tensor]:
        bs = self.hparams["fit_batch_size"]
        return [images[i : i + bs].to(self.device) for i in range(0, len(images), bs)]

    def concept_maps(self, datamodule: ImageData) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Images and student activations of every set in the concept spec, at ``layer``.

        Returns:
            ``(images, maps)``: set name -> ``uint8 [N, C, H, W]``, and set name -> activations
            ``[N, *shape]`` (not flattened). In ``position`` mode both also hold a blank image
            under :data:`BLANK` (the reference for :func:`cdistill.concepts.cav.position_rows`). With a
            teacher the activations are cached on disk (see :mod:`cdistill.teacher.feature_cache`).
        """
        spec = self.cfg.concepts.spec
        if not spec:
            raise CdistillError("model.concepts.spec is not set: give the concept-set YAML spec.")
        kw: dict[str, Any] = {"channels": datamodule.num_channels, "size": datamodule.image_size}
        images = load_spec(spec, **kw)
        if self.cav_mode == "position":
            first = next(iter(images.values()))
            images[BLANK] = torch.zeros_like(first[:1])

        def compute() -> dict[str, Tensor]:
            return {
                name: collect_activations(
                    self.student, self.layer, self._loader(preprocess(x, datamodule.normalize, **kw)), flatten=False
                )
                for name, x in images.items()
            }

        if self.cfg.teacher is None:
            return images, compute()
        key = fingerprint(self.student, self.layer, images, datamodule.mean, datamodule.std, kw)
        maps = cached_tensors(self.cfg.teacher.cache_dir, "student", key, compute)
        return images, {k: v.to(self.device) for k, v in maps.items()}

    def cav_rows(self, maps: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """CAV training rows of every set from its activations (see :meth:`concept_maps` and
        :func:`cdistill.objective.cav_fitter.concept_rows`)."""
        blank = maps[BLANK][0] if BLANK in maps else None
        return concept_rows({k: v for k, v in maps.items() if k != BLANK}, self.cfg.concepts.cav, blank)

    def concept_activations(self, datamodule: ImageData) -> dict[str, Tensor]:
        """CAV training rows of every set in the concept spec, in student space (see :meth:`cav_rows`)."""
        return self.cav_rows(self.concept_maps(datamodule)[1])

    def fit_cavs(self, acts: Mapping[str, Tensor]) -> tuple[CAVBank, Tensor]:
        """Fit one CAV per (term, class) and return the bank and ``cav_index [T, C]``."""
        bank, index = self.cav_fitter.fit(lambda layer: acts)
        return bank, index.to(self.device)

    def _teacher_cavs(
        self, images: Mapping[str, Tensor], maps: Mapping[str, Tensor], bank: CAVBank, index: Tensor
    ) -> tuple[CAVBank, Tensor]:
        """Map the teacher's features of the concept images into the student's layer space and
        fit the CAVs there too; return the bank that ``teacher.cav_space`` selects.

        Records both spaces' held-out CAV accuracies side by side in ``artefact_metrics``
        (``cav/acc_student``, ``cav/acc_teacher``, ``cav/acc_<space>/<concept>``) and the
        mapping's ``L_map`` terms (``teacher/map_*``).
        """
        cfg = self.cfg.teacher
        assert cfg is not None
        stage = map_concept_sets(cfg, images, maps, exclude=(BLANK,))
        t_bank, t_index = self.fit_cavs(self.cav_rows({k: v.to(self.device) for k, v in stage.mapped.items()}))
        m = self.artefact_metrics
        m["cav/acc_teacher"] = float(t_bank.accuracies.mean())
        for space, b in (("student", bank), ("teacher", t_bank)):
            for concept, acc in zip(b.concepts, b.accuracies.tolist(), strict=True):
                m[f"cav/acc_{space}/{concept}"] = float(acc)
        m |= stage.metrics()
        for lg in self.loggers:
            for row in stage.fit.history:
                lg.log_metrics({f"teacher/map_{k}": v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))
        log.info("CAV held-out accuracy, student space %.3f vs mapped teacher space %.3f; using %s space",
                 m["cav/acc_student"], m["cav/acc_teacher"], cfg.cav_space)
        if cfg.cav_space == "teacher":
            return t_bank, t_index
        return bank, index

    @torch.no_grad()
    def fit_prototypes(self, datamodule: ImageData) -> Prototypes:
        """K-means (K = 1: class means) of the training activations at ``layer``."""
        fitter = PrototypeFitter(self.hparams["num_classes"], self.cfg.prototypes.k, seed=0)
        train = datamodule.split("train")
        loader = torch.utils.data.DataLoader(train, batch_size=self.hparams["fit_batch_size"], shuffle=False)
        with eval_mode(self.student):
            for batch in loader:
                with capture(self.student, self.layer, detach=True) as store:
                    self.student(batch["image"].to(self.device))
                fitter.update(store[self.layer], batch["label"].to(self.device))
        return fitter.compute()

    def _fit_concept_cavs(self, datamodule: ImageData) -> None:
        """Fit the CAVs (student space, then the teacher's when configured) and the signal CAVs
        (student space), each when its term is on, and log their figures."""
        images, maps = self.concept_maps(datamodule)
        rows = self.cav_rows(maps)
        self.artefact_metrics = {}
        if self.needs_cavs:
            bank, index = self.fit_cavs(rows)
            self.artefact_metrics["cav/acc_student"] = float(bank.accuracies.mean())
            if self.cfg.teacher is not None:
                bank, index = self._teacher_cavs(images, maps, bank, index)
            self.cavs = bank.to(self.device)
            self.cav_index = index
            self.cav_fitter.check_subspaces(self.cavs, self.cav_index)
            log.info("fitted %d CAVs at %s: accuracies %s", len(bank), self.layer,
                     [round(float(a), 3) for a in bank.accuracies])
        if self.needs_signal_cavs:
            self.signal_cavs, self.signal_cav_index = self.fit_signal_cavs(rows)
            self.artefact_metrics["cav/acc_signal"] = float(self.signal_cavs.accuracies.mean())
            log.info("fitted %d signal CAVs at %s: accuracies %s", len(self.signal_cavs), self.layer,
                     [round(float(a), 3) for a in self.signal_cavs.accuracies])
        for lg in self.loggers:
            lg.log_metrics(self.artefact_metrics, step=0)

    def fit_signal_cavs(self, acts: Mapping[str, Tensor]) -> tuple[CAVBank, Tensor]:
        """The signal CAVs (normalised mean differences, gated like the CAVs) and their index."""
        if self.signal_fitter is None:
            raise CdistillError("Signal CAVs are fitted only when model.lambda_rr > 0.")
        bank, index = self.signal_fitter.fit(lambda layer: acts)
        return bank.to(self.device), index.to(self.device)

    def fit_artefacts(self, datamodule: ImageData) -> None:
        """Fit CAVs, prototypes and erasers on the current student, then make all ranks agree."""
        self.input_mean = datamodule.mean.to(self.device)
        self.input_std = datamodule.std.to(self.device)
        if self.needs_cavs or self.needs_signal_cavs:
            self._fit_concept_cavs(datamodule)
        if self.needs_prototypes:
            self.prototypes = self.fit_prototypes(datamodule).to(self.device)
        if self.erasure_specs:
            self.fit_erasers(datamodule)
        self._broadcast_artefacts()
        self.artefacts_fitted = torch.tensor(True, device=self.device)

    def refresh_cavs(self, datamodule: ImageData) -> None:
        """Refit the CAVs (and the signal CAVs) on the current student and blend them into the
        running ones; the concept images' activations are computed once for both."""
        rows: dict[str, Tensor] = {}

        def acts() -> dict[str, Tensor]:
            if not rows:
                rows.update(self.concept_activations(datamodule))
            return rows

        when = f"at step {self.global_step}"
        if self.needs_cavs:
            self.cavs, self.cav_index = self.cav_fitter.refresh(
                self.cavs, self.cav_index, lambda: self.fit_cavs(acts()), when=when,
            )
        if self.signal_fitter is not None and self.signal_cavs is not None:
            self.signal_cavs, self.signal_cav_index = self.signal_fitter.refresh(
                self.signal_cavs, self.signal_cav_index, lambda: self.fit_signal_cavs(acts()), when=when,
            )
        self._broadcast_artefacts()

    def refresh_prototypes(self, datamodule: ImageData) -> None:
        """Blend prototypes fitted on the current student into the running ones."""
        self.prototypes.ema_update_(self.fit_prototypes(datamodule), float(self.cfg.prototypes.ema))
        self._broadcast_artefacts()

    def _broadcast_artefacts(self) -> None:
        """Give every rank rank 0's CAVs and erasers (no-op without DDP). The prototypes need no
        broadcast: :class:`~cdistill.objective.prototypes.PrototypeFitter` already gives every rank
        the same centres (sums reduced over ranks, or rank 0's K-means centres), and a refresh
        blends identical centres into identical ones."""
        broadcast_bank(self._trainer, self.cavs, self.device)
        owners: list[tuple[nn.Module, str]] = [(self, "cav_index")]
        if self.signal_cavs is not None:
            broadcast_bank(self._trainer, self.signal_cavs, self.device)
            owners.append((self, "signal_cav_index"))
        owners += [(e, name) for e in self.erasers.values() for name, _ in list(e.named_buffers())]
        broadcast_buffers(self._trainer, owners, self.device)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        # The artefacts are fitted once: a resumed run does not refit them, so it reports the
        # figures of that fit (e.g. cav/acc_student) from the checkpoint.
        checkpoint["cdistill"]["artefact_metrics"] = dict(self.artefact_metrics)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("cdistill", {}).get("artefact_metrics")
        if saved is not None:
            self.artefact_metrics = {str(k): float(v) for k, v in saved.items()}
