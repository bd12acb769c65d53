"""ConceptDistillModule: task loss + concept loss + prototype loss + local loss.

``L = L_task + λ_c Σ_t w_t L_c,t + λ_p L_p + λ_L L_local`` (docs/methods.md §2.7); a term is
computed only when its λ is > 0, and every term is logged (``train/task``, ``train/concept``,
``train/concept/<term>``, ``train/prototype``, ``train/local``).

Concept artefacts (a CAV bank and class prototypes at ``layer``) are fitted on the student as
it is when training starts — in the pipeline, the biased base model — unless a checkpoint
already holds them. They are buffers: checkpoints carry them, ``.to(device)`` moves them, and
under DDP rank 0's values are broadcast so every rank holds identical ones.

With ``erasure`` set, linear concept erasers (docs/methods.md §4) are fitted at the same time
for the bias concept at the named layers and applied as forward hooks in every training and
evaluation forward; ``lambda_c`` may be 0 for erasure alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn

from cdistill.concepts import load_spec, preprocess
from cdistill.concepts.cav import CAVBank, fit_cav, position_rows
from cdistill.erasure import LeaceFitter, LowRankEraser
from cdistill.erasure.hooks import (
    ErasureSpec,
    bias_probe_accuracy,
    erase,
    eraser_key,
    fit_layer_erasers,
    specs_from_config,
)
from cdistill.errors import CdistillError
from cdistill.models.students import first_conv
from cdistill.objective.losses import (
    CAV_MODES,
    DIRECTIONS,
    LOGIT_TARGETS,
    POSITION_WEIGHTS,
    check_subspace_rank,
    concept_loss,
    corner_mask,
    foreground_mask,
    local_loss,
    logprob_gradient,
    position_gradients,
    prototype_gradient,
)
from cdistill.objective.prototypes import PrototypeFitter, Prototypes
from cdistill.tasks.classifier import Batch, ClassifierModule, to_plain
from cdistill.teacher.feature_cache import cached_tensors, fingerprint
from cdistill.teacher.stage import check_teacher_config, map_concept_sets
from cdistill.utils.artefacts import broadcast_bank, broadcast_buffers
from cdistill.utils.capture import capture, collect_activations, eval_mode, resolve_module

log = logging.getLogger(__name__)
FORMS = ("prototype", "logit")
#: Key of the blank reference image among the concept maps (``position`` mode).
BLANK = "__blank__"


def term_name(term: Mapping[str, Any]) -> str:
    """Short name of a concept term for log keys (``color_{y}`` -> ``color_y``)."""
    return str(term.get("name") or term["concept"]).replace("{y}", "y")


class ConceptDistillModule(ClassifierModule):
    """Concept-sensitive fine-tuning of a student (see module docstring).

    Args:
        layer: Module path of the student layer the concept loss acts on (e.g. ``conv2``).
        form: ``prototype`` (``|cos(a - Pbar_y, v)|``, no double backward) or ``logit``
            (``∇_a log p(y|x)`` by one batched double backward).
        target: Scalar the logit form differentiates: ``logprob`` (``log p(y|x)``, default),
            ``logit`` (``z_y``), ``margin`` (``z_y - logsumexp_{k≠y} z_k``) or ``random``
            (``z_k``, ``k`` uniform per sample); see :func:`cdistill.objective.losses.logit_target`.
        lambda_c: Weight of the concept loss (0: off).
        lambda_p: Weight of the prototype loss ``Σ_j ||a - P_yj||² / d`` (0: off).
        lambda_l: Weight of the local input-gradient loss (0: off).
        concepts: ``spec`` (YAML concept spec), ``terms`` (list of ``{concept, negative,
            direction, weight, classes, name}``; ``{y}`` in ``concept`` picks the concept of
            each sample's class, e.g. ``color_{y}``; ``subspace: true`` penalises the
            gradient's component in the span of all the term's CAVs instead, or in its top
            ``rank`` singular directions), ``solver``,
            ``min_accuracy`` (gate), ``test_fraction``, ``refresh_every_n_steps`` (0: static
            CAVs), ``ema``, and ``cav_mode``: ``flatten`` (default; one CAV on the flattened
            map, ``d = C·H·W``) or ``position`` (for conv maps: one CAV in the ``C``-dim channel
            space, fitted on the positions where concept images have content, see
            :func:`cdistill.concepts.cav.position_rows`, with ``position_threshold`` and ``max_rows``;
            the loss is the cosine at each position, averaged with ``position_weight``
            ``norm`` (weights = gradient norms) or ``uniform``).
        prototypes: ``k`` (K-means centres per class; 1 = class mean),
            ``refresh_every_n_epochs`` (0: fixed) and ``ema`` (weight of fresh centres).
        local: ``mask`` (``foreground`` or ``corners``), ``threshold`` and ``fraction``
            (foreground pixels sampled).
        erasure: ``layers`` (module paths, in forward order), ``mode`` (``position``,
            ``flatten`` or ``token``), ``method`` (``leace`` ... see
            :data:`cdistill.erasure.METHODS`), ``concept`` (batch key of the concept ids,
            ``bias``), ``positive`` (ClArC), ``options``, ``refit_every_n_steps`` and
            ``refit_every_n_epochs`` (0 and 0: fitted once on the base model). ``None``: no erasure.
        teacher: ``None`` (CAVs fitted on the student's own activations) or the teacher stage's
            config (:mod:`cdistill.teacher.stage`: ``name``, ``layer``, ``pca_dims``, ``mapping``,
            ``cav_space`` ...): CAVs are fitted on the teacher's features of the concept images
            mapped into the student's layer space (docs/methods.md §2.5). The teacher is used
            once, before training, and is never a submodule (not trained, not in the optimizer,
            not wrapped by DDP, not in checkpoints).
        fit_batch_size: Batch size for computing activations when fitting artefacts.
        **kwargs: :class:`ClassifierModule` arguments (``student``, ``optimizer`` ...).
    """

    def __init__(
        self,
        layer: str,
        form: str = "prototype",
        target: str = "logprob",
        lambda_c: float = 1.0,
        lambda_p: float = 0.0,
        lambda_l: float = 0.0,
        concepts: Mapping[str, Any] | None = None,
        prototypes: Mapping[str, Any] | None = None,
        local: Mapping[str, Any] | None = None,
        erasure: Mapping[str, Any] | None = None,
        teacher: Mapping[str, Any] | None = None,
        fit_batch_size: int = 500,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        concepts = dict(to_plain(concepts) or {})
        prototypes = dict(to_plain(prototypes) or {})
        local = dict(to_plain(local) or {})
        erasure = dict(to_plain(erasure) or {}) or None
        teacher = dict(to_plain(teacher) or {}) or None
        if form not in FORMS:
            raise CdistillError(f"model.form={form!r}: use one of {FORMS}.")
        if target not in LOGIT_TARGETS:
            raise CdistillError(f"model.target={target!r}: use one of {LOGIT_TARGETS}.")
        for key, value in (("lambda_c", lambda_c), ("lambda_p", lambda_p), ("lambda_l", lambda_l)):
            if not value >= 0:  # also NaN; a negative weight would switch the term off unnoticed
                raise CdistillError(f"model.{key}={value}: a loss weight must be >= 0 (0 switches the term off).")
        terms = list(concepts.get("terms") or [])
        if lambda_c > 0 and not terms:
            raise CdistillError("model.lambda_c > 0 but model.concepts.terms is empty: name at least one concept.")
        for t in terms:
            if t.get("direction", "desensitize") not in DIRECTIONS:
                raise CdistillError(f"Concept term {t}: direction must be one of {DIRECTIONS}.")
            if t.get("rank") is not None and (not isinstance(t["rank"], int) or t["rank"] < 1):
                raise CdistillError(f"Concept term {t}: rank must be a whole number >= 1 (or null: the whole span).")
        if concepts.get("cav_mode", "flatten") not in CAV_MODES:
            raise CdistillError(f"model.concepts.cav_mode={concepts['cav_mode']!r}: use one of {CAV_MODES}.")
        if concepts.get("position_weight", "norm") not in POSITION_WEIGHTS:
            raise CdistillError(
                f"model.concepts.position_weight={concepts['position_weight']!r}: use one of {POSITION_WEIGHTS}."
            )
        resolve_module(self.student, layer)  # a wrong layer fails now, listing close names
        if teacher is not None:
            check_teacher_config(teacher)
            if int(concepts.get("refresh_every_n_steps", 0)) > 0:
                raise CdistillError(
                    "Teacher-space CAVs are fitted once, before training: set "
                    "model.concepts.refresh_every_n_steps=0 (or model.teacher=null)."
                )
        self.erasure_specs: list[ErasureSpec] = specs_from_config(erasure) if erasure else []
        for spec in self.erasure_specs:
            resolve_module(self.student, spec.layer)
        self.save_hyperparameters(
            {
                "layer": layer, "form": form, "target": target, "lambda_c": lambda_c, "lambda_p": lambda_p,
                "lambda_l": lambda_l, "concepts": concepts, "prototypes": prototypes,
                "local": local, "erasure": erasure, "teacher": teacher, "fit_batch_size": fit_batch_size,
            }
        )
        self.layer = layer
        self.terms = terms
        self.teacher_cfg = teacher
        #: Figures of the last artefact fit (CAV accuracies per space, mapping terms): train() reports them.
        self.artefact_metrics: dict[str, float] = {}
        num_classes = self.hparams["num_classes"]
        self.cavs = CAVBank()
        self.prototypes = Prototypes()
        # Placeholders (resized when a checkpoint is loaded, see LowRankEraser).
        self.erasers = nn.ModuleDict({eraser_key(s.layer): LowRankEraser.identity(1) for s in self.erasure_specs})
        self.register_buffer("cav_index", torch.full((len(terms), num_classes), -1, dtype=torch.long))
        self.register_buffer("term_weights", torch.tensor([float(t.get("weight", 1.0)) for t in terms]))
        self.register_buffer(
            "sensitize", torch.tensor([t.get("direction", "desensitize") == "sensitize" for t in terms], dtype=torch.bool)
        )
        # Derived from the config alone: not persistent, so checkpoints written before these
        # options existed still load strictly.
        self.register_buffer(
            "subspace", torch.tensor([bool(t.get("subspace", False)) for t in terms], dtype=torch.bool), persistent=False
        )
        self.register_buffer(
            "subspace_rank", torch.tensor([int(t.get("rank") or 0) for t in terms], dtype=torch.long), persistent=False
        )
        # Pixel statistics of the datamodule: the local loss needs un-normalised images.
        conv = first_conv(self.student)
        chans = conv.in_channels if conv is not None else 3
        self.register_buffer("input_mean", torch.zeros(chans))
        self.register_buffer("input_std", torch.ones(chans))
        self.register_buffer("artefacts_fitted", torch.tensor(False))

    # Buffers registered above (typed for mypy).
    cav_index: Tensor
    term_weights: Tensor
    sensitize: Tensor
    subspace: Tensor
    subspace_rank: Tensor
    input_mean: Tensor
    input_std: Tensor
    artefacts_fitted: Tensor

    # ------------------------------------------------------------------ fitting
    @property
    def needs_cavs(self) -> bool:
        return self.hparams["lambda_c"] > 0

    @property
    def needs_prototypes(self) -> bool:
        return self.hparams["lambda_p"] > 0 or (self.needs_cavs and self.hparams["form"] == "prototype")

    def _loader(self, images: Tensor) -> list[Tensor]:
        bs = self.hparams["fit_batch_size"]
        return [images[i : i + bs].to(self.device) for i in range(0, len(images), bs)]

    @property
    def cav_mode(self) -> str:
        """``flatten`` or ``position`` (see the class docstring)."""
        return str(self.hparams["concepts"].get("cav_mode", "flatten"))

    def concept_maps(self, datamodule: Any) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Images and student activations of every set in the concept spec, at ``layer``.

        Returns:
            ``(images, maps)``: set name -> ``uint8 [N, C, H, W]``, and set name -> activations
            ``[N, *shape]`` (not flattened). In ``position`` mode both also hold a blank image
            under :data:`BLANK` (the reference for :func:`cdistill.concepts.cav.position_rows`). With a
            teacher the activations are cached on disk (see :mod:`cdistill.teacher.feature_cache`).
        """
        spec = self.hparams["concepts"].get("spec")
        if not spec:
            raise CdistillError("model.concepts.spec is not set: give the concept-set YAML spec.")
        kw = {"channels": datamodule.num_channels, "size": datamodule.image_size}
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

        if self.teacher_cfg is None:
            return images, compute()
        key = fingerprint(self.student, self.layer, images, datamodule.mean, datamodule.std, kw)
        maps = cached_tensors(self.teacher_cfg.get("cache_dir"), "student", key, compute)
        return images, {k: v.to(self.device) for k, v in maps.items()}

    def cav_rows(self, maps: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """CAV training rows of every set from its activations (see :meth:`concept_maps`).

        Returns:
            ``{name: [N, d]}`` flattened activations (``cav_mode=flatten``), or
            ``{name: [M, C]}`` channel vectors at the content positions of the set's images
            (``cav_mode=position``).
        """
        cfg = self.hparams["concepts"]
        out = {}
        for i, (name, acts) in enumerate((k, v) for k, v in maps.items() if k != BLANK):
            if self.cav_mode == "position":
                acts = position_rows(
                    acts, maps[BLANK][0], threshold=float(cfg.get("position_threshold", 0.1)),
                    max_rows=cfg.get("max_rows", 20000), seed=i,
                )
            out[name] = acts.flatten(1) if self.cav_mode != "position" else acts
        return out

    def concept_activations(self, datamodule: Any) -> dict[str, Tensor]:
        """CAV training rows of every set in the concept spec, in student space (see :meth:`cav_rows`)."""
        return self.cav_rows(self.concept_maps(datamodule)[1])

    def _negative(self, acts: Mapping[str, Tensor], name: str) -> Tensor:
        if name in acts:
            return acts[name]
        pool = [v for k, v in acts.items() if k.startswith(f"{name}/")]
        if not pool:
            raise CdistillError(f"Negative set {name!r} is not in the concept spec; it has {sorted(acts)}.")
        return torch.cat(pool)

    def fit_cavs(self, acts: Mapping[str, Tensor]) -> tuple[CAVBank, Tensor]:
        """Fit one CAV per (term, class) and return the bank and ``cav_index [T, C]``."""
        cfg = self.hparams["concepts"]
        bank = CAVBank()
        index = torch.full_like(self.cav_index, -1)
        fitted: dict[tuple[str, str], int] = {}
        min_acc = float(cfg.get("min_accuracy", 0.7))
        for t, term in enumerate(self.terms):
            classes = term.get("classes")
            classes = range(self.hparams["num_classes"]) if classes is None else classes
            negative = str(term.get("negative", "random"))
            for k in classes:
                concept = str(term["concept"]).format(y=k)
                if concept not in acts:
                    raise CdistillError(
                        f"Concept {concept!r} (term {term_name(term)!r}) is not in the concept spec; "
                        f"it has {sorted(acts)}."
                    )
                key = (concept, negative)
                if key not in fitted:
                    res = fit_cav(
                        acts[concept], self._negative(acts, negative), str(cfg.get("solver", "logistic")),
                        test_fraction=float(cfg.get("test_fraction", 0.3)), seed=0,
                        concept=concept, negative=negative, layer=self.layer,
                    )
                    if res.accuracy < min_acc:
                        rank_zero_warn(
                            f"CAV {concept!r} vs {negative!r} at {self.layer!r} has held-out accuracy "
                            f"{res.accuracy:.3f} < {min_acc}: not trusted, its term is skipped for class {k}."
                        )
                        fitted[key] = -1
                    else:
                        fitted[key] = bank.add(res)
                index[t, k] = fitted[key]
        if self.terms and bool((index < 0).all()):
            raise CdistillError(
                "Every CAV fell below the accuracy gate (model.concepts.min_accuracy): the layer "
                f"{self.layer!r} does not separate the concept sets. Try another layer."
            )
        return bank, index.to(self.device)

    def check_subspaces(self) -> None:
        """Check every subspace term's rank against the span of its fitted CAVs (see
        :func:`cdistill.objective.losses.check_subspace_rank`)."""
        for t, term in enumerate(self.terms):
            rows = self.cav_index[t][self.cav_index[t] >= 0].unique()
            if bool(self.subspace[t]) and len(rows):
                check_subspace_rank(self.cavs.vectors[rows], int(self.subspace_rank[t]) or None, term_name(term))

    @torch.no_grad()
    def fit_prototypes(self, datamodule: Any) -> Prototypes:
        """K-means (K = 1: class means) of the training activations at ``layer``."""
        cfg = self.hparams["prototypes"]
        fitter = PrototypeFitter(self.hparams["num_classes"], int(cfg.get("k", 1)), seed=0)
        train = datamodule.split("train")
        loader = torch.utils.data.DataLoader(train, batch_size=self.hparams["fit_batch_size"], shuffle=False)
        with eval_mode(self.student):
            for batch in loader:
                with capture(self.student, self.layer, detach=True) as store:
                    self.student(batch["image"].to(self.device))
                fitter.update(store[self.layer], batch["label"].to(self.device))
        return fitter.compute()

    def fit_artefacts(self, datamodule: Any) -> None:
        """Fit CAVs and prototypes on the current student, then make all ranks agree."""
        self.input_mean = datamodule.mean.to(self.device)
        self.input_std = datamodule.std.to(self.device)
        if self.needs_cavs:
            images, maps = self.concept_maps(datamodule)
            bank, index = self.fit_cavs(self.cav_rows(maps))
            self.artefact_metrics = {"cav/acc_student": float(bank.accuracies.mean())}
            if self.teacher_cfg is not None:
                bank, index = self._teacher_cavs(images, maps, bank, index)
            self.cavs = bank.to(self.device)
            self.cav_index = index
            self.check_subspaces()
            log.info("fitted %d CAVs at %s: accuracies %s", len(bank), self.layer, [round(float(a), 3) for a in bank.accuracies])
            for lg in self.loggers:
                lg.log_metrics(self.artefact_metrics, step=0)
        if self.needs_prototypes:
            self.prototypes = self.fit_prototypes(datamodule).to(self.device)
        if self.erasure_specs:
            self.fit_erasers(datamodule)
        self._broadcast_artefacts()
        self.artefacts_fitted = torch.tensor(True, device=self.device)

    def _teacher_cavs(
        self, images: Mapping[str, Tensor], maps: Mapping[str, Tensor], bank: CAVBank, index: Tensor
    ) -> tuple[CAVBank, Tensor]:
        """Map the teacher's features of the concept images into the student's layer space and
        fit the CAVs there too; return the bank that ``teacher.cav_space`` selects.

        Records both spaces' held-out CAV accuracies side by side in ``artefact_metrics``
        (``cav/acc_student``, ``cav/acc_teacher``, ``cav/acc_<space>/<concept>``) and the
        mapping's ``L_map`` terms (``teacher/map_*``).
        """
        cfg = self.teacher_cfg
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
                 m["cav/acc_student"], m["cav/acc_teacher"], cfg.get("cav_space", "teacher"))
        if cfg.get("cav_space", "teacher") == "teacher":
            return t_bank, t_index
        return bank, index

    def fit_erasers(self, datamodule: Any) -> None:
        """Fit the erasers on the whole train split with the current student.

        Under DDP with streaming methods (LEACE, orth) rank r streams samples r, r + W, ...
        (every sample exactly once: no DistributedSampler padding is counted twice, and
        unequal shards are fine) and the statistics are summed across ranks before the build.
        Other methods keep activations in memory and fit on the whole split on every rank.
        Either way :meth:`_broadcast_artefacts` then gives all ranks rank 0's buffers, bitwise.
        """
        train = datamodule.split("train")
        trainer = self._trainer
        world = trainer.world_size if trainer is not None else 1
        reduce: Callable[[LeaceFitter], object] | None = None
        if world > 1 and dist.is_initialized() and all(s.streaming for s in self.erasure_specs):
            assert trainer is not None
            train = torch.utils.data.Subset(train, range(trainer.global_rank, len(train), world))
            reduce = LeaceFitter.all_reduce_
        loader = torch.utils.data.DataLoader(train, batch_size=self.hparams["fit_batch_size"], shuffle=False)
        fitted = fit_layer_erasers(self.student, self.erasure_specs, loader, self.hparams["num_bias_groups"],
                                   reduce=reduce)
        for layer, eraser in fitted.items():
            self.erasers[eraser_key(layer)] = eraser.float().to(self.device)
        log.info("fitted erasers: %s", {k: repr(v) for k, v in self.erasers.items()})

    def _refit_due(self, step: int, batch_idx: int) -> bool:
        """Refit the erasers now? Every ``refit_every_n_steps`` steps, and/or after the last
        batch of every ``refit_every_n_epochs``-th epoch, so that validation, the checkpoint
        and the test see erasers fitted on the weights they evaluate. (The student keeps
        training under a frozen eraser and moves the concept into directions it does not
        touch: without refits a probe after fine-tuning finds the concept again.)"""
        cfg = self.hparams["erasure"] or {}
        every_steps = int(cfg.get("refit_every_n_steps", 0))
        every_epochs = int(cfg.get("refit_every_n_epochs", 0))
        if every_steps > 0 and step > 0 and step % every_steps == 0:
            return True
        trainer = self._trainer
        if every_epochs <= 0 or trainer is None:
            return False
        last_batch = batch_idx + 1 >= int(trainer.num_training_batches)
        return last_batch and (self.current_epoch + 1) % every_epochs == 0

    def _layer_erasers(self) -> tuple[dict[str, nn.Module], dict[str, str]]:
        """Layer path -> eraser and layer path -> mode, in spec order."""
        erasers = {s.layer: self.erasers[eraser_key(s.layer)] for s in self.erasure_specs}
        return erasers, {s.layer: s.mode for s in self.erasure_specs}

    def _erasing(self) -> AbstractContextManager[None]:
        """Context applying the erasers, once fitted (before that, e.g. a bare module: none)."""
        if not self.erasure_specs or not bool(self.artefacts_fitted):
            return nullcontext()
        return erase(self.student, *self._layer_erasers())

    def _broadcast_artefacts(self) -> None:
        """Give every rank rank 0's CAVs, prototypes and erasers (no-op without DDP)."""
        broadcast_bank(self._trainer, self.cavs, self.device)
        owners: list[tuple[nn.Module, str]] = [(self.prototypes, "centers"), (self, "cav_index")]
        owners += [(e, name) for e in self.erasers.values() for name, _ in list(e.named_buffers())]
        broadcast_buffers(self._trainer, owners, self.device)

    def on_fit_start(self) -> None:
        # Artefacts restored from a checkpoint are kept: resuming must not refit them.
        if not bool(self.artefacts_fitted):
            self.fit_artefacts(self.trainer.datamodule)  # type: ignore[attr-defined]

    def on_train_epoch_start(self) -> None:
        every = int(self.hparams["prototypes"].get("refresh_every_n_epochs", 0))
        epoch = self.current_epoch
        if self.needs_prototypes and every > 0 and epoch > 0 and epoch % every == 0:
            fresh = self.fit_prototypes(self.trainer.datamodule)  # type: ignore[attr-defined]
            self.prototypes.ema_update_(fresh, float(self.hparams["prototypes"].get("ema", 0.3)))
            self._broadcast_artefacts()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = self.global_step
        if self.erasure_specs and self._refit_due(step, batch_idx):
            self.fit_erasers(self.trainer.datamodule)  # type: ignore[attr-defined]
            self._broadcast_artefacts()
        every = int(self.hparams["concepts"].get("refresh_every_n_steps", 0))
        if not self.needs_cavs or every <= 0 or step == 0 or step % every:
            return
        acts = self.concept_activations(self.trainer.datamodule)  # type: ignore[attr-defined]
        bank, index = self.fit_cavs(acts)
        if not torch.equal(index, self.cav_index):
            # A CAV crossed the gate: adopt the new bank rather than blend mismatched rows.
            self.cavs, self.cav_index = bank.to(self.device), index
        else:
            ema = float(self.hparams["concepts"].get("ema", 0.3))
            blended = (1 - ema) * self.cavs.vectors + ema * bank.vectors.to(self.device)
            self.cavs.vectors = F.normalize(blended, dim=1)
        self._broadcast_artefacts()

    # ------------------------------------------------------------------ objective
    def _local_mask(self, images: Tensor) -> Tensor:
        cfg = self.hparams["local"]
        kind = cfg.get("mask", "foreground")
        if kind == "corners":
            return corner_mask(tuple(images.shape), int(cfg.get("size", 5)), images.device)
        if kind != "foreground":
            raise CdistillError(f"model.local.mask={kind!r}: use foreground or corners.")
        raw = images * self.input_std.view(1, -1, 1, 1) + self.input_mean.view(1, -1, 1, 1)
        # Sampled with the module's generator (on the CPU), whose state checkpoints carry.
        mask = foreground_mask(raw.cpu(), float(cfg.get("threshold", 0.1)), float(cfg.get("fraction", 0.5)), self.rng)
        return mask.to(images.device)

    def _logit_target(self, labels: Tensor, num_classes: int) -> tuple[Tensor, str]:
        """``(labels, target)`` for :func:`logprob_gradient`. The ``random`` target (the logit
        of a class drawn per sample) is the ``logit`` target at classes drawn from the module's
        generator, whose state checkpoints carry (a resumed run draws the same classes).

        Args:
            labels: ``[B]`` true classes.
            num_classes: Number of logits.
        """
        target = str(self.hparams.get("target", "logprob"))
        if target != "random":
            return labels, target
        drawn = torch.randint(0, num_classes, labels.shape, generator=self.rng)
        return drawn.to(labels.device), "logit"

    def compute_losses(self, batch: Batch) -> dict[str, Tensor]:
        """``loss`` and each active term (``task``, ``concept``, ``concept/<term>``,
        ``prototype``, ``local``), plus ``logits``. Callable without a Trainer once the
        artefacts are fitted (:meth:`fit_artefacts`)."""
        hp = self.hparams
        x, y = batch["image"], batch["label"]
        if hp["lambda_l"] > 0 or (hp["lambda_c"] > 0 and hp["form"] == "logit"):
            # The local loss differentiates w.r.t. the pixels; the logit form may act at the
            # input itself (layer ``input``), whose output needs a graph too.
            x = x.detach().requires_grad_(True)
        # The erasure hooks go first, so a concept loss at an erased layer sees erased activations.
        with self._erasing(), capture(self.student, self.layer, check_finite=False) as store:
            logits = self.student(x)
        acts = store[self.layer]
        task = F.cross_entropy(logits, y)
        out: dict[str, Tensor] = {"task": task, "logits": logits}
        loss = task
        if hp["lambda_c"] > 0:
            if hp["form"] == "prototype":
                if acts.grad_fn is None:
                    # a - P_y of a leaf (e.g. layer `input`) depends on no parameter: the term
                    # would be logged but could never change the model.
                    raise CdistillError(
                        f"model.form=prototype at layer {self.layer!r}: its activation depends on no "
                        "trainable parameter, so the prototype-form concept loss cannot train anything. "
                        "Use model.form=logit there, or a layer after a trainable one."
                    )
                grads = prototype_gradient(acts, self.prototypes.mean_center(y))
            else:
                grads = logprob_gradient(acts, logits, *self._logit_target(y, logits.shape[1]))
            if self.cav_mode == "position":
                grads = position_gradients(grads, tuple(acts.shape[1:]))  # [B, H*W, C]
            lc, per_term = concept_loss(
                grads, y, self.cavs.vectors, self.cav_index, self.sensitize, self.term_weights,
                subspace=self.subspace, ranks=self.subspace_rank, position_weight=str(hp["concepts"].get("position_weight", "norm")),
            )
            out["concept"] = lc
            for term, value in zip(self.terms, per_term, strict=True):
                out[f"concept/{term_name(term)}"] = value
            loss = loss + hp["lambda_c"] * lc
        if hp["lambda_p"] > 0:
            out["prototype"] = self.prototypes.loss(acts, y).mean()
            loss = loss + hp["lambda_p"] * out["prototype"]
        if hp["lambda_l"] > 0:
            out["local"] = local_loss(x, logits, y, self._local_mask(x.detach()))
            loss = loss + hp["lambda_l"] * out["local"]
        out["loss"] = loss
        return out

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

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]`` of the student, with the erasers applied."""
        with self._erasing():
            return self.student(x)

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        if self.erasure_specs and bool(self.artefacts_fitted):
            self.log_dict(self.bias_probe(self.trainer.datamodule), sync_dist=False)  # type: ignore[attr-defined]

    def bias_probe(self, datamodule: Any) -> dict[str, float]:
        """Held-out accuracy of a linear probe for the concept at each erased layer, with and
        without the erasers, on the ``val`` split (never used to fit them).

        Returns:
            ``test/bias_probe_acc`` (erased), ``test/bias_probe_acc_unerased`` and
            ``test/bias_probe_chance``; with several layers the keys end in ``/<layer>``.
        """
        loader = torch.utils.data.DataLoader(datamodule.split("val"), batch_size=self.hparams["fit_batch_size"])
        erasers, modes = self._layer_erasers()
        nb = self.hparams["num_bias_groups"]
        out: dict[str, float] = {}
        for spec in self.erasure_specs:
            suffix = f"/{spec.layer}" if len(self.erasure_specs) > 1 else ""
            after = bias_probe_accuracy(self.student, spec.layer, spec.mode, loader, nb, erasers=erasers,
                                        modes=modes, concept=spec.concept)
            before = bias_probe_accuracy(self.student, spec.layer, spec.mode, loader, nb, concept=spec.concept)
            out[f"test/bias_probe_acc{suffix}"] = after["acc"]
            out[f"test/bias_probe_acc_unerased{suffix}"] = before["acc"]
            out[f"test/bias_probe_chance{suffix}"] = after["chance"]
        return out
