"""The teacher stage of concept distillation: teacher features -> one PCA -> E_M -> student space.

Runs once, before training (docs/methods.md §2.5):

1. the frozen teacher reads every concept image at its layer, with its own preprocessing
   (features cached on disk, keyed by the teacher's weights, layer, preprocessing and images);
2. one PCA is fitted over all concept sets together (``pca_dims``; 0 or null: none);
3. the mapping autoencoder is trained on (teacher features, student activations) pairs of all
   concept images;
4. every set's teacher features are mapped into the student's layer space by ``E_M``, where
   :class:`cdistill.tasks.distill.ConceptDistillModule` fits its CAVs.

Config (``model.teacher``): :class:`~cdistill.teacher.config.TeacherConfig`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from cdistill.errors import CdistillError
from cdistill.teacher.config import TeacherConfig
from cdistill.teacher.feature_cache import cached_tensors, fingerprint
from cdistill.teacher.mapping import PCA, MappingFit, fit_mapping, fit_pca
from cdistill.teacher.offline import ensure_digits_ae
from cdistill.teacher.teachers import Teacher, create_teacher


def check_teacher_config(cfg: TeacherConfig | Mapping[str, Any]) -> TeacherConfig:
    """The typed config of ``cfg``; a config that cannot work fails now (before any training)."""
    return cfg if isinstance(cfg, TeacherConfig) else TeacherConfig.from_dict(cfg)


def teacher_from_config(cfg: TeacherConfig | Mapping[str, Any]) -> Teacher:
    """Build the frozen teacher ``cfg`` describes; the offline ``cdistill:digits_ae`` teacher is
    trained (once, cached under ``cache_dir``) when no checkpoint is given."""
    cfg = check_teacher_config(cfg)
    kw = cfg.teacher_kwargs()
    if cfg.name == "cdistill:digits_ae" and not cfg.checkpoint_path:
        if not cfg.cache_dir:
            raise CdistillError("The offline teacher needs model.teacher.cache_dir (where its trained weights are kept).")
        train = dict(cfg.train or {})
        kw["checkpoint_path"] = str(ensure_digits_ae(cfg.cache_dir, train))
        if train.get("width"):
            kw["model_kwargs"] = {**(kw.get("model_kwargs") or {}), "width": int(train["width"])}
    return create_teacher(cfg.name, cfg.layer, **kw)


@dataclass
class TeacherStage:
    """Result of :func:`map_concept_sets`."""

    mapped: dict[str, Tensor]
    fit: MappingFit
    pca: PCA | None
    teacher_shape: tuple[int, ...]

    def metrics(self) -> dict[str, float]:
        """The best epoch's ``L_map`` terms: ``teacher/map_recon`` ... ``teacher/map_val_match``."""
        row = self.fit.history[self.fit.best_epoch]
        return {f"teacher/map_{k}": float(v) for k, v in row.items() if k != "epoch"}


def map_concept_sets(
    cfg: TeacherConfig | Mapping[str, Any],
    images: Mapping[str, Tensor],
    student_maps: Mapping[str, Tensor],
    exclude: Sequence[str] = (),
) -> TeacherStage:
    """Teacher features of the concept images, mapped into the student's layer space.

    Args:
        cfg: The ``model.teacher`` config (:class:`~cdistill.teacher.config.TeacherConfig` or its dict).
        images: Set name -> ``uint8 [N, C, H, W]`` concept images.
        student_maps: Set name -> student activations ``[N, *shape]`` of the same images.
        exclude: Sets mapped but left out of the PCA and of the mapping's training (a blank
            reference image).

    Returns:
        :class:`TeacherStage` with ``mapped``: set name -> ``E_M(t)`` ``[N, *shape]``.
    """
    cfg = check_teacher_config(cfg)
    teacher = teacher_from_config(cfg)
    key = fingerprint(teacher.model, teacher.layer, teacher.image_size, teacher.mean, teacher.std,
                      teacher.resize, teacher.prefix_tokens, images)
    cap = cfg.cache_max_bytes  # after the student's file of this refresh: caps both
    feats = cached_tensors(cfg.cache_dir, "teacher", key, lambda: {k: teacher.features(v) for k, v in images.items()},
                           max_bytes=None if cap is None else int(cap))
    fit_sets = {k: v for k, v in feats.items() if k not in exclude}
    dims = int(cfg.pca_dims)
    pca = fit_pca(fit_sets, dims) if dims else None  # ONE basis over all concept sets
    reduced = {k: pca(v) if pca is not None else v for k, v in feats.items()}
    names = list(fit_sets)
    t = torch.cat([reduced[k] for k in names])
    s = torch.cat([student_maps[k].detach().float().cpu() for k in names])
    fit = fit_mapping(t, s, **dict(cfg.mapping))
    mapped = {k: fit.model.map(v) for k, v in reduced.items()}
    return TeacherStage(mapped, fit, pca, tuple(t.shape[1:]))
