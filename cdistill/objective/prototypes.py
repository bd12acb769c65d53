"""Class prototypes at a layer: K-means centres of each class's activations.

For class ``y`` with prototypes ``P_y1..P_yK`` the prototype loss of an activation ``a``
(flattened to ``[d]``) is ``L_p(a) = Σ_j ||a - P_yj||² / d``. Its gradient
``(2K/d)(a - Pbar_y)`` only needs the mean prototype ``Pbar_y`` (see
:meth:`Prototypes.mean_center`), which the concept loss uses. ``K = 1`` gives the class
mean.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from cdistill.errors import CdistillError
from cdistill.utils.buffers import FittedBuffers


def _sq_dists(x: Tensor, centers: Tensor) -> Tensor:
    """Squared Euclidean distances ``[n, k]`` between rows of ``x`` and ``centers``."""
    d2 = x.pow(2).sum(1, keepdim=True) - 2 * x @ centers.T + centers.pow(2).sum(1)
    return d2.clamp_min_(0)


def _kmeans_pp(x: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """k-means++ seeding: each next centre is drawn with probability ∝ D(x)²."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    centers = [x[first]]
    d2 = _sq_dists(x, x[first : first + 1]).squeeze(1)
    for _ in range(1, k):
        # Sampling on the CPU keeps the seeded generator independent of the device.
        weights = d2.double().cpu()
        if float(weights.sum()) > 0:
            idx = int(torch.multinomial(weights, 1, generator=gen))
        else:  # all points coincide with chosen centres
            idx = int(torch.randint(n, (1,), generator=gen))
        centers.append(x[idx])
        d2 = torch.minimum(d2, _sq_dists(x, x[idx : idx + 1]).squeeze(1))
    return torch.stack(centers)


def kmeans(
    x: Tensor, k: int, *, generator: torch.Generator | None = None, max_iter: int = 100
) -> tuple[Tensor, Tensor]:
    """K-means (k-means++ seeding, Lloyd iterations) on the device of ``x``.

    An empty cluster is re-seeded with the point farthest from its current centre. With
    ``k = 1`` the single centre is exactly ``x.mean(0)``.

    Args:
        x: Points ``[n, d]`` with ``n >= k``.
        k: Number of clusters.
        generator: CPU generator for the seeding (default: seed 0).
        max_iter: Maximum Lloyd iterations (stops early when assignments settle).

    Returns:
        ``(centers [k, d], assignment [n])``.
    """
    n = x.shape[0]
    if k < 1 or n < k:
        raise CdistillError(f"K-means needs 1 <= k <= number of points; got k={k}, n={n}.")
    if k == 1:
        return x.mean(0, keepdim=True), torch.zeros(n, dtype=torch.long, device=x.device)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    # Centring first keeps the ||x||² - 2 x·c + ||c||² distances accurate for offset data.
    offset = x.mean(0)
    x = x - offset
    centers = _kmeans_pp(x, k, gen)
    assign: Tensor | None = None
    for _ in range(max_iter):
        dists = _sq_dists(x, centers)
        new_assign = dists.argmin(1)
        if assign is not None and torch.equal(new_assign, assign):
            break
        assign = new_assign
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        centers = sums / counts.clamp_min(1).to(x.dtype)[:, None]
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            own = dists.gather(1, assign[:, None]).squeeze(1)
            for j in empty:
                far = int(own.argmax())
                centers[j] = x[far]
                own[far] = -1.0  # do not hand the same point to two empty clusters
    return centers + offset, _sq_dists(x, centers).argmin(1)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class Prototypes(FittedBuffers):
    """Class prototypes as a buffer ``centers [num_classes, K, d]``.

    Being a buffer, the centres travel with ``.to(device)`` and with checkpoints; a
    freshly built (unfitted) module adopts the checkpoint's shape on load.
    """

    centers: Tensor
    resizable = ("centers",)

    def __init__(self, centers: Tensor | None = None) -> None:
        super().__init__()
        if centers is not None and centers.ndim != 3:
            raise CdistillError(
                f"Prototype centres must be [num_classes, K, d], got {tuple(centers.shape)}."
            )
        self.register_buffer("centers", torch.zeros(0, 0, 0) if centers is None else centers.clone())

    @property
    def fitted(self) -> bool:
        """Whether centres have been set."""
        return self.centers.numel() > 0

    @property
    def num_classes(self) -> int:
        return self.centers.shape[0]

    @property
    def k(self) -> int:
        """Centres per class ``K``."""
        return self.centers.shape[1]

    @property
    def dim(self) -> int:
        """Dimension ``d`` of the flattened activations."""
        return self.centers.shape[2]

    def _check(self) -> None:
        if not self.fitted:
            raise CdistillError(
                "Prototypes are not fitted yet: compute them with PrototypeFitter before "
                "using the prototype or concept loss."
            )

    def mean_center(self, labels: Tensor) -> Tensor:
        """Mean prototype of each sample's class, ``Pbar_y``: labels ``[N]`` -> ``[N, d]``."""
        self._check()
        return self.centers.mean(1)[labels]

    def loss(self, acts: Tensor, labels: Tensor) -> Tensor:
        """Prototype loss ``Σ_j ||a - P_yj||² / d`` per sample.

        Uses ``Σ_j ||a - P_j||² = K ||a - Pbar||² + Σ_j ||P_j - Pbar||²``, so memory is
        ``[N, d]`` rather than ``[N, K, d]``.

        Args:
            acts: Activations ``[N, ...]`` (flattened to ``[N, d]``).
            labels: Classes ``[N]``.

        Returns:
            ``[N]``.
        """
        self._check()
        a = acts.reshape(acts.shape[0], -1)
        if a.shape[1] != self.dim:
            raise CdistillError(
                f"Activations have d={a.shape[1]} but the prototypes have d={self.dim}; "
                "fit the prototypes at the same layer."
            )
        mean = self.centers.mean(1)  # [C, d]
        spread = (self.centers - mean[:, None]).pow(2).sum((1, 2))  # [C]
        close = (a - mean[labels]).pow(2).sum(1)
        return (self.k * close + spread[labels]) / self.dim

    @torch.no_grad()
    def ema_update_(self, new: Tensor | Prototypes, weight: float = 0.3) -> None:
        """Blend in freshly fitted centres: ``centers = (1 - w) centers + w new``.

        For ``K > 1`` each new centre is first matched to an old one of the same class
        (Hungarian matching on squared distances), since K-means numbers its clusters
        arbitrarily. An unfitted module just takes ``new``.

        Args:
            new: Centres ``[num_classes, K, d]`` or another :class:`Prototypes`.
            weight: EMA weight of the new centres (the paper's refresh used 0.3).
        """
        fresh = (new.centers if isinstance(new, Prototypes) else new).to(self.centers)
        if not self.fitted:
            self.centers = fresh.clone()
            return
        if fresh.shape != self.centers.shape:
            raise CdistillError(
                f"New prototypes {tuple(fresh.shape)} do not match the current ones "
                f"{tuple(self.centers.shape)}."
            )
        if self.k > 1:
            cost = torch.cdist(self.centers.double(), fresh.double()).pow(2).cpu().numpy()
            perm = np.stack([linear_sum_assignment(c)[1] for c in cost])
            fresh = fresh.gather(1, torch.as_tensor(perm, device=fresh.device)[..., None].expand_as(fresh))
        self.centers.mul_(1 - weight).add_(fresh, alpha=weight)

    @torch.no_grad()
    def broadcast_(self, src: int = 0) -> None:
        """Copy rank ``src``'s centres to every DDP rank (no-op without torch.distributed).

        All ranks must call it. Shapes are broadcast first, so unfitted ranks are fine.
        """
        if not _distributed():
            return
        shape = torch.tensor(self.centers.shape, dtype=torch.long, device=self.centers.device)
        dist.broadcast(shape, src)
        if tuple(shape.tolist()) != tuple(self.centers.shape):
            self.centers = self.centers.new_empty(tuple(shape.tolist()))
        dist.broadcast(self.centers, src)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, k={self.k}, d={self.dim}"


class PrototypeFitter:
    """Accumulates activations per class, then fits :class:`Prototypes`.

    ``K = 1`` keeps float64 running sums (exact class means, constant memory); ``K > 1``
    keeps the activations themselves (at most ``max_per_class`` per class; the first ones
    seen, so feed shuffled data) and runs K-means per class.

    Under DDP, every rank must call :meth:`compute`. Sample counts are summed over ranks
    (so errors agree); with ``K = 1`` the sums are too, giving the exact global mean on all
    ranks; with ``K > 1`` rank 0 clusters its own samples and broadcasts the centres.
    """

    def __init__(
        self,
        num_classes: int,
        K: int = 1,
        *,
        max_per_class: int | None = None,
        seed: int = 0,
        max_iter: int = 100,
    ) -> None:
        if num_classes < 1 or K < 1:
            raise CdistillError(f"Need num_classes >= 1 and K >= 1, got {num_classes}, {K}.")
        self.num_classes, self.K = num_classes, K
        self.max_per_class, self.seed, self.max_iter = max_per_class, seed, max_iter
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        self._counts: Tensor | None = None  # samples seen per class [C]
        self._sums: Tensor | None = None  # K = 1: float64 sums [C, d]
        self._kept: Tensor | None = None  # K > 1: samples kept per class [C]
        self._acts: list[Tensor] = []
        self._labels: list[Tensor] = []
        self._dtype = torch.float32

    @torch.no_grad()
    def update(self, acts: Tensor, labels: Tensor) -> None:
        """Add a batch: activations ``[N, ...]`` (flattened to ``[N, d]``), classes ``[N]``."""
        a = acts.detach().reshape(acts.shape[0], -1)
        y = labels.detach().to(a.device, torch.long)
        if y.shape != (a.shape[0],):
            raise CdistillError(f"Got labels {tuple(y.shape)} for {a.shape[0]} activations.")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise CdistillError(
                f"Labels must be in [0, {self.num_classes}), got range "
                f"[{int(y.min())}, {int(y.max())}]."
            )
        if self._counts is None:
            self._counts = torch.zeros(self.num_classes, dtype=torch.long, device=a.device)
            self._kept = torch.zeros_like(self._counts)
            self._dtype = a.dtype if a.dtype == torch.float64 else torch.float32
            if self.K == 1:
                self._sums = torch.zeros(self.num_classes, a.shape[1], dtype=torch.float64, device=a.device)
        batch_counts = torch.bincount(y, minlength=self.num_classes)
        self._counts += batch_counts
        if self._sums is not None:
            self._sums.index_add_(0, y, a.double())
            return
        assert self._kept is not None
        if self.max_per_class is not None:
            # Rank of each sample within its class in this batch (stable order).
            order = torch.argsort(y, stable=True)
            starts = torch.cumsum(batch_counts, 0) - batch_counts
            rank = torch.empty_like(y)
            rank[order] = torch.arange(len(y), device=y.device) - starts[y[order]]
            keep = self._kept[y] + rank < self.max_per_class
            a, y = a[keep], y[keep]
        self._kept += torch.bincount(y, minlength=self.num_classes)
        self._acts.append(a.to(self._dtype))
        self._labels.append(y)

    @torch.no_grad()
    def compute(self) -> Prototypes:
        """Fit the prototypes from everything accumulated.

        Raises:
            CdistillError: A class has no samples (named), or fewer than ``K``.
        """
        if self._counts is None:
            raise CdistillError("PrototypeFitter.compute() called before any update().")
        counts = self._counts.clone()
        if _distributed():
            dist.all_reduce(counts)
        missing = (counts == 0).nonzero().flatten().tolist()
        if missing:
            raise CdistillError(
                f"No training activations for class(es) {missing}: every class needs samples "
                "to get prototypes. Check the labels, num_classes and the data split."
            )
        if self._sums is not None:
            sums = self._sums.clone()
            if _distributed():
                dist.all_reduce(sums)
            return Prototypes((sums / counts[:, None].double()).to(self._dtype)[:, None])
        return self._compute_kmeans()

    def _compute_kmeans(self) -> Prototypes:
        assert self._kept is not None
        kept = self._kept.clone()
        if _distributed():
            # The smallest per-rank count decides, so every rank raises (or not) together.
            dist.all_reduce(kept, op=dist.ReduceOp.MIN)
        short = (kept < self.K).nonzero().flatten().tolist()
        if short:
            have = {c: int(kept[c]) for c in short}
            raise CdistillError(
                f"Class(es) {short} have fewer samples than K={self.K} prototypes "
                f"(samples: {have}); lower K or feed more data."
            )
        acts, labels = torch.cat(self._acts), torch.cat(self._labels)
        order = torch.argsort(labels, stable=True)
        groups = torch.split(acts[order], self._kept.tolist())
        centers = []
        for c, x in enumerate(groups):
            gen = torch.Generator().manual_seed(self.seed + c)
            centers.append(kmeans(x, self.K, generator=gen, max_iter=self.max_iter)[0])
        protos = Prototypes(torch.stack(centers))
        protos.broadcast_(0)
        return protos
