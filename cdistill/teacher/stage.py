"""The teacher stage of concept distillation: teacher features -> one PCA -> E_M -> student space.

Runs once, before training (docs/methods.md §2.5):

1. the frozen teacher reads every concept image at its layer, with its own preprocessing
   (features cached on disk, keyed by the teacher's weights, layer, preprocessing and images);
2. one PCA is fitted over all concept sets together (``pca_dims``; 0 or null: none);
3. the mapping autoencoder is trained on (teacher features, student activations) pairs of all
   concept images;
4. every set's teacher features are mapped into the student's layer space by ``E_M``, where
   :class:`cdistill.tasks.distill.ConceptDistillModule` fits its CAVs.

Config (``model.teacher``): ``name``, ``layer``, ``checkpoint_path``, ``pretrained``,
``image_size``, ``mean``, ``std``, ``in_chans``, ``resize``, ``prefix_tokens``,
``model_kwargs``, ``train`` (settings of the offline ``cdistill:digits_ae`` teacher, trained when
no checkpoint is given), ``pca_dims``, ``mapping`` (:func:`cdistill.teacher.mapping.fit_mapping`
arguments), ``cav_space`` (``teacher`` or ``student``), ``cache_dir``, ``cache_max_bytes``
(cap of the feature files in ``cache_dir``, least recently used evicted first; null: no cap).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cdistill.errors import CdistillError
from cdistill.teacher.feature_cache import DEFAULT_MAX_BYTES, cached_tensors, fingerprint
from cdistill.teacher.mapping import PCA, MappingFit, fit_mapping, fit_pca
from cdistill.teacher.offline import ensure_digits_ae
from cdistill.teacher.teachers import Teacher, create_teacher

#: Where the CAVs are fitted with a teacher; the first is the default.
CAV_SPACES = ("teacher", "student")
_TEACHER_KEYS = ("checkpoint_path", "pretrained", "image_size", "mean", "std", "in_chans", "resize",
                 "prefix_tokens", "model_kwargs")


def cav_space(cfg: Mapping[str, Any]) -> str:
    """``model.teacher.cav_space`` (unset or null: ``teacher``)."""
    return str(cfg.get("cav_space") or CAV_SPACES[0])


def check_teacher_config(cfg: Mapping[str, Any]) -> None:
    """Fail early on a teacher config that cannot work (before any training)."""
    for key in ("name", "layer"):
        if not cfg.get(key):
            raise CdistillError(f"model.teacher.{key} is not set; see conf/teacher/ for examples.")
    if cav_space(cfg) not in CAV_SPACES:
        raise CdistillError(f"model.teacher.cav_space={cfg['cav_space']!r}: use one of {CAV_SPACES}.")
    cap = cfg.get("cache_max_bytes")
    if cap is not None and int(cap) < 0:
        raise CdistillError(f"model.teacher.cache_max_bytes={cap} must be >= 0 (null: no cap on the feature cache).")
    path = cfg.get("checkpoint_path")
    if path == "???":  # OmegaConf's mark of a mandatory value left unset
        raise CdistillError(
            f"model.teacher.checkpoint_path is not set: give a local checkpoint of {cfg['name']} "
            "(or model.teacher.pretrained=true to fetch its weights when online)."
        )
    if path and not Path(str(path)).expanduser().is_file():
        raise CdistillError(f"Teacher checkpoint {str(path)!r} does not exist; fix model.teacher.checkpoint_path.")


def teacher_from_config(cfg: Mapping[str, Any]) -> Teacher:
    """Build the frozen teacher ``cfg`` describes; the offline ``cdistill:digits_ae`` teacher is
    trained (once, cached under ``cache_dir``) when no checkpoint is given."""
    check_teacher_config(cfg)
    kw = {k: cfg[k] for k in _TEACHER_KEYS if cfg.get(k) is not None}
    if cfg["name"] == "cdistill:digits_ae" and not cfg.get("checkpoint_path"):
        if not cfg.get("cache_dir"):
            raise CdistillError("The offline teacher needs model.teacher.cache_dir (where its trained weights are kept).")
        kw["checkpoint_path"] = str(ensure_digits_ae(cfg["cache_dir"], cfg.get("train") or {}))
        if (cfg.get("train") or {}).get("width"):
            kw.setdefault("model_kwargs", {})["width"] = int(cfg["train"]["width"])
    return create_teacher(str(cfg["name"]), str(cfg["layer"]), **kw)


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
    cfg: Mapping[str, Any],
    images: Mapping[str, Tensor],
    student_maps: Mapping[str, Tensor],
    exclude: Sequence[str] = (),
) -> TeacherStage:
    """Teacher features of the concept images, mapped into the student's layer space.

    Args:
        cfg: The ``model.teacher`` config (module docstring).
        images: Set name -> ``uint8 [N, C, H, W]`` concept images.
        student_maps: Set name -> student activations ``[N, *shape]`` of the same images.
        exclude: Sets mapped but left out of the PCA and of the mapping's training (a blank
            reference image).

    Returns:
        :class:`TeacherStage` with ``mapped``: set name -> ``E_M(t)`` ``[N, *shape]``.
    """
    teacher = teacher_from_config(cfg)
    key = fingerprint(teacher.model, teacher.layer, teacher.image_size, teacher.mean, teacher.std,
                      teacher.resize, teacher.prefix_tokens, images)
    cap = cfg.get("cache_max_bytes", DEFAULT_MAX_BYTES)  # after the student's file of this refresh: caps both
    feats = cached_tensors(cfg.get("cache_dir"), "teacher", key, lambda: {k: teacher.features(v) for k, v in images.items()},
                           max_bytes=None if cap is None else int(cap))
    fit_sets = {k: v for k, v in feats.items() if k not in exclude}
    dims = int(cfg.get("pca_dims") or 0)
    pca = fit_pca(fit_sets, dims) if dims else None  # ONE basis over all concept sets
    reduced = {k: pca(v) if pca is not None else v for k, v in feats.items()}
    names = list(fit_sets)
    t = torch.cat([reduced[k] for k in names])
    s = torch.cat([student_maps[k].detach().float().cpu() for k in names])
    fit = fit_mapping(t, s, **dict(cfg.get("mapping") or {}))
    mapped = {k: fit.model.map(v) for k, v in reduced.items()}
    return TeacherStage(mapped, fit, pca, tuple(t.shape[1:]))
