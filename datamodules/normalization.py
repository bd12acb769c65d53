"""Per-channel normalisation from the training split's statistics, shared by the datamodules."""

from __future__ import annotations

from torch import Tensor


class ChannelNormalization:
    """Mixin for a datamodule whose ``setup()`` sets ``_mean`` and ``_std`` (``float32 [C]``,
    the train split's per-channel pixel statistics in ``[0, 1]`` units)."""

    _mean: Tensor | None
    _std: Tensor | None

    def setup(self, stage: str | None = None) -> None:  # pragma: no cover - the datamodule's own
        raise NotImplementedError

    @property
    def mean(self) -> Tensor:
        """``float32 [C]`` per-channel pixel mean of the train split, in ``[0, 1]`` units."""
        self.setup()
        assert self._mean is not None
        return self._mean

    @property
    def std(self) -> Tensor:
        """``float32 [C]`` per-channel pixel std of the train split, in ``[0, 1]`` units."""
        self.setup()
        assert self._std is not None
        return self._std

    def normalize(self, x: Tensor) -> Tensor:
        """Map images in ``[0, 1]`` (``[..., C, H, W]``) to the normalised space."""
        mean, std = (t.to(x.device, x.dtype).view(-1, 1, 1) for t in (self.mean, self.std))
        return (x - mean) / std

    def denormalize(self, x: Tensor) -> Tensor:
        """Undo :meth:`normalize`: ``[..., C, H, W]`` normalised -> ``[0, 1]`` pixel units."""
        mean, std = (t.to(x.device, x.dtype).view(-1, 1, 1) for t in (self.mean, self.std))
        return x * std + mean
