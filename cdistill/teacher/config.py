"""``model.teacher``: the typed settings of the teacher stage (:mod:`cdistill.teacher.stage`).

A frozen dataclass that validates itself when built (before any training) and round-trips
through plain dicts (``to_dict`` / ``from_dict``), so it is stored in Lightning ``hparams`` and
checkpoints that load with ``weights_only=True``; older checkpoints, which hold the YAML dict
itself, load through the same ``from_dict``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from cdistill.errors import CdistillError
from cdistill.objective.config_base import PlainConfig, build, without_nulls
from cdistill.teacher.feature_cache import DEFAULT_MAX_BYTES

#: Where the CAVs are fitted with a teacher; the first is the default.
CAV_SPACES = ("teacher", "student")
#: The keys passed on to :func:`cdistill.teacher.teachers.create_teacher` when set.
TEACHER_KEYS = ("checkpoint_path", "pretrained", "image_size", "mean", "std", "in_chans", "resize",
                "prefix_tokens", "model_kwargs")


@dataclass(frozen=True)
class TeacherConfig(PlainConfig):
    """``model.teacher`` (examples: ``conf/teacher/``).

    Args:
        name: Teacher model (:func:`~cdistill.teacher.teachers.create_teacher`), e.g.
            ``timm:vit_base_patch8_224.dino`` or ``cdistill:digits_ae``.
        layer: Module path of the teacher's feature layer.
        checkpoint_path, pretrained, image_size, mean, std, in_chans, resize, prefix_tokens,
            model_kwargs: :func:`~cdistill.teacher.teachers.create_teacher` arguments
            (``None``: its default).
        train: Settings of the offline ``cdistill:digits_ae`` teacher, trained when no
            checkpoint is given (:func:`~cdistill.teacher.offline.ensure_digits_ae`).
        pca_dims: Dimensions of the one PCA over all concept sets (0: none).
        mapping: :func:`~cdistill.teacher.mapping.fit_mapping` arguments.
        cav_space: ``teacher`` (CAVs on the mapped teacher features) or ``student``.
        cache_dir: Where teacher and student features (and the offline teacher) are cached.
        cache_max_bytes: Cap of the feature files in ``cache_dir``, least recently used evicted
            first; ``None`` (an explicit YAML ``null``): no cap.
    """

    where: ClassVar[str] = "model.teacher"
    choices: ClassVar[Mapping[str, tuple[str, ...]]] = {"cav_space": CAV_SPACES}
    name: str = ""
    layer: str = ""
    checkpoint_path: str | None = None
    pretrained: bool | None = None
    image_size: int | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    in_chans: int | None = None
    resize: bool | None = None
    prefix_tokens: int | None = None
    model_kwargs: Mapping[str, Any] | None = None
    train: Mapping[str, Any] | None = None
    pca_dims: int = 0
    mapping: Mapping[str, Any] = field(default_factory=dict)
    cav_space: str = CAV_SPACES[0]
    cache_dir: str | None = None
    cache_max_bytes: int | None = DEFAULT_MAX_BYTES

    def __post_init__(self) -> None:
        for key in ("name", "layer"):
            if not getattr(self, key):
                raise CdistillError(f"model.teacher.{key} is not set; see conf/teacher/ for examples.")
        super().__post_init__()
        if self.cache_max_bytes is not None and int(self.cache_max_bytes) < 0:
            raise CdistillError(f"model.teacher.cache_max_bytes={self.cache_max_bytes} must be >= 0 "
                                "(null: no cap on the feature cache).")
        path = self.checkpoint_path
        if path == "???":  # OmegaConf's mark of a mandatory value left unset
            raise CdistillError(
                f"model.teacher.checkpoint_path is not set: give a local checkpoint of {self.name} "
                "(or model.teacher.pretrained=true to fetch its weights when online)."
            )
        if path and not Path(str(path)).expanduser().is_file():
            raise CdistillError(f"Teacher checkpoint {str(path)!r} does not exist; fix model.teacher.checkpoint_path.")

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any] | None) -> TeacherConfig:
        """Parse the YAML form; ``null`` is the default, except ``cache_max_bytes: null`` (no cap)."""
        values = without_nulls(cfg)
        if cfg is not None and "cache_max_bytes" in cfg and cfg["cache_max_bytes"] is None:
            values["cache_max_bytes"] = None
        return build(cls, values, cls.where)

    def teacher_kwargs(self) -> dict[str, Any]:
        """The :func:`~cdistill.teacher.teachers.create_teacher` keyword arguments that are set."""
        return {k: getattr(self, k) for k in TEACHER_KEYS if getattr(self, k) is not None}
