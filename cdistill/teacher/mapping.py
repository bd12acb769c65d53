"""Teacher-to-student feature mapping: one PCA, and the mapping autoencoder E_M / D_M.

docs/methods.md §2.5: teacher features ``t`` (optionally reduced by **one** PCA fitted over all
concept sets together) are mapped into the student's layer space by ``E_M`` and back by
``D_M``, trained on concept images with ``L_map = MSE(D_M(E_M(t)), t) + MSE(E_M(t), a)``.
CAVs are then fitted on ``E_M(t)``.

Feature shapes are ``(C, H, W)`` for maps and ``(D,)`` for vectors. For two maps the layers
are chosen from the grids: equal grids -> 1x1 ``Conv2d``; student grid ``r`` times larger ->
``ConvTranspose2d`` (kernel = stride = r); ``r`` times smaller -> strided ``Conv2d``; other
ratios need ``resize`` (bilinear to the other grid, then 1x1). Vectors use ``Linear``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdistill.errors import CdistillError
from cdistill.utils.capture import eval_mode

log = logging.getLogger(__name__)
KINDS = ("auto", "conv", "linear")


def _channel_rows(x: Tensor) -> Tensor:
    """``[N, C, H, W]`` -> ``[N*H*W, C]``; ``[N, D]`` stays."""
    return x.movedim(1, -1).reshape(-1, x.shape[1]) if x.dim() == 4 else x


class PCA(nn.Module):
    """A channel-space PCA: ``[N, C, H, W] -> [N, k, H, W]`` at every position (or ``[N, D] -> [N, k]``).

    Args:
        mean: ``[C]``.
        components: ``[C, k]`` orthonormal columns, by decreasing variance.
    """

    def __init__(self, mean: Tensor, components: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("components", components.float())

    mean: Tensor
    components: Tensor

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4:
            return torch.einsum("nchw,ck->nkhw", x - self.mean.view(1, -1, 1, 1), self.components)
        return (x - self.mean) @ self.components


def fit_pca(sets: Mapping[str, Tensor], dims: int, max_rows: int = 200_000, seed: int = 0) -> PCA:
    """Fit ONE PCA over the features of all concept sets together (never per set).

    Args:
        sets: Set name -> teacher features ``[N, C, H, W]`` or ``[N, D]``.
        dims: Components kept (``<= C``).
        max_rows: Rows (positions x images) used at most, sampled evenly over the sets' rows.
        seed: Seed of that sample.

    Raises:
        CdistillError: No sets, mixed shapes, or ``dims`` larger than the channel count.
    """
    if not sets:
        raise CdistillError("PCA over concept sets: no sets given.")
    shapes = {tuple(v.shape[1:]) for v in sets.values()}
    if len(shapes) != 1:
        raise CdistillError(f"PCA over concept sets: the sets have different feature shapes {sorted(shapes)}.")
    rows = torch.cat([_channel_rows(v) for v in sets.values()]).double()
    if dims > rows.shape[1]:
        raise CdistillError(f"model.teacher.pca_dims={dims} exceeds the teacher's {rows.shape[1]} channels.")
    if len(rows) > max_rows:
        rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:max_rows]]
    mean = rows.mean(0)
    cov = (rows - mean).T @ (rows - mean) / max(len(rows) - 1, 1)
    _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
    return PCA(mean, vecs.flip(1)[:, :dims])


def _grid_layers(tc: int, sc: int, th: int, sh: int) -> tuple[nn.Module, nn.Module] | None:
    """E (teacher -> student channels/grid) and D (back) for square grids th, sh; None if no integer ratio."""
    if th == sh:
        return nn.Conv2d(tc, sc, 1), nn.Conv2d(sc, tc, 1)
    if sh % th == 0:
        r = sh // th
        return nn.ConvTranspose2d(tc, sc, r, stride=r), nn.Conv2d(sc, tc, r, stride=r)
    if th % sh == 0:
        r = th // sh
        return nn.Conv2d(tc, sc, r, stride=r), nn.ConvTranspose2d(sc, tc, r, stride=r)
    return None


class _Resize(nn.Module):
    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)


class MappingAutoencoder(nn.Module):
    """``E_M``: teacher space -> student layer space; ``D_M``: back.

    Args:
        teacher_shape: ``(C_t, H_t, W_t)`` or ``(D_t,)`` (after PCA).
        student_shape: ``(C_s, H_s, W_s)`` or ``(D_s,)``.
        kind: ``auto`` (conv for two maps, else linear), ``conv`` or ``linear`` (flattened).
        hidden: Width of a hidden layer with ReLU in each direction (0: linear maps).
        resize: Allow grids of a non-integer ratio by bilinear resizing.

    Raises:
        CdistillError: Shapes that no mapping of this kind can join (names both shapes and the
            config key to set).
    """

    def __init__(
        self,
        teacher_shape: Sequence[int],
        student_shape: Sequence[int],
        kind: str = "auto",
        hidden: int = 0,
        resize: bool = False,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise CdistillError(f"model.teacher.mapping.kind={kind!r}: use one of {KINDS}.")
        t_shape, s_shape = tuple(int(v) for v in teacher_shape), tuple(int(v) for v in student_shape)
        self.teacher_shape, self.student_shape = t_shape, s_shape
        maps = len(t_shape) == 3 and len(s_shape) == 3
        if kind == "conv" and not maps:
            raise CdistillError(
                f"Teacher features {t_shape} and student activations {s_shape}: a conv mapping needs two "
                "[C, H, W] maps; set model.teacher.mapping.kind=linear."
            )
        self.kind = "conv" if kind == "auto" and maps else ("linear" if kind == "auto" else kind)
        if self.kind == "conv":
            self.encode, self.decode = self._conv(t_shape, s_shape, hidden, resize)
        else:
            dt, ds = _numel(t_shape), _numel(s_shape)
            self.encode, self.decode = _mlp(dt, ds, hidden), _mlp(ds, dt, hidden)

    @staticmethod
    def _conv(t: tuple[int, ...], s: tuple[int, ...], hidden: int, resize: bool) -> tuple[nn.Module, nn.Module]:
        (tc, th, tw), (sc, sh, sw) = t, s
        if (th, tw) == (sh, sw):
            layers: tuple[nn.Module, nn.Module] | None = nn.Conv2d(tc, sc, 1), nn.Conv2d(sc, tc, 1)
        else:
            layers = _grid_layers(tc, sc, th, sh) if th == tw and sh == sw else None
        resized = layers is None
        if layers is None:
            if not resize:
                raise CdistillError(
                    f"Cannot map teacher features {t} to student activations {s}: the grids {th}x{tw} and "
                    f"{sh}x{sw} have no integer ratio. Set model.teacher.mapping.resize=true (bilinear "
                    "resize), or model.teacher.mapping.kind=linear, or pick another teacher layer / "
                    "model.teacher.image_size."
                )
            layers = nn.Conv2d(tc, sc, 1), nn.Conv2d(sc, tc, 1)
        enc, dec = layers
        if hidden:
            enc = nn.Sequential(nn.Conv2d(tc, hidden, 1), nn.ReLU(), _retarget(enc, hidden, None))
            dec = nn.Sequential(_retarget(dec, None, hidden), nn.ReLU(), nn.Conv2d(hidden, tc, 1))
        if resized:
            enc = nn.Sequential(_Resize((sh, sw)), enc)
            dec = nn.Sequential(dec, _Resize((th, tw)))
        return enc, dec

    def forward(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``t [N, *teacher_shape]`` -> (``E_M(t) [N, *student_shape]``, ``D_M(E_M(t)) [N, *teacher_shape]``)."""
        if self.kind == "linear":
            z = self.encode(t.flatten(1)).view(-1, *self.student_shape)
            return z, self.decode(z.flatten(1)).view(-1, *self.teacher_shape)
        z = self.encode(t)
        return z, self.decode(z)

    @torch.no_grad()
    def map(self, t: Tensor, batch_size: int = 512) -> Tensor:
        """``E_M(t)`` in eval mode, batched: ``[N, *student_shape]``."""
        with eval_mode(self):
            return torch.cat([self(t[i : i + batch_size])[0] for i in range(0, len(t), batch_size)])


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for v in shape:
        n *= v
    return n


def _mlp(d_in: int, d_out: int, hidden: int) -> nn.Module:
    if not hidden:
        return nn.Linear(d_in, d_out)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


def _retarget(layer: nn.Module, in_ch: int | None, out_ch: int | None) -> nn.Module:
    """The same kind of (transposed) conv as ``layer`` with new channel counts."""
    assert isinstance(layer, nn.Conv2d | nn.ConvTranspose2d)
    k, st = int(layer.kernel_size[0]), int(layer.stride[0])  # square kernels only (see _grid_layers)
    cls = type(layer)
    return cls(in_ch or layer.in_channels, out_ch or layer.out_channels, k, stride=st)


@dataclass
class MappingFit:
    """The trained mapping and its per-epoch history (both L_map terms, train and validation)."""

    model: MappingAutoencoder
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0


def _terms(model: MappingAutoencoder, t: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    z, back = model(t)
    return F.mse_loss(back, t), F.mse_loss(z, a)


def _train_epoch(
    model: MappingAutoencoder, opt: torch.optim.Optimizer, teacher: Tensor, student: Tensor, perm: Tensor, batch_size: int
) -> dict[str, float]:
    """One pass over the rows ``perm`` in minibatches; the mean ``recon`` and ``match`` terms."""
    sums = torch.zeros(2)
    for start in range(0, len(perm), batch_size):
        idx = perm[start : start + batch_size]
        recon, match = _terms(model, teacher[idx], student[idx])
        opt.zero_grad(set_to_none=True)
        (recon + match).backward()
        opt.step()
        sums += torch.stack([recon.detach(), match.detach()]).cpu() * len(idx)
    return {"recon": float(sums[0]) / len(perm), "match": float(sums[1]) / len(perm)}


def fit_mapping(
    teacher: Tensor,
    student: Tensor,
    *,
    kind: str = "auto",
    hidden: int = 0,
    resize: bool = False,
    epochs: int = 200,
    batch_size: int = 256,
    lr: float = 3e-3,
    val_fraction: float = 0.2,
    patience: int = 10,
    seed: int = 0,
) -> MappingFit:
    """Train ``E_M``/``D_M`` with ``L_map`` by Adam on mini-batches, early-stopped on a validation split.

    Args:
        teacher: ``[N, *teacher_shape]`` teacher features of the concept images.
        student: ``[N, *student_shape]`` student activations of the same images, same order.
        kind, hidden, resize: See :class:`MappingAutoencoder`.
        epochs: At most this many passes.
        batch_size: Mini-batch size.
        lr: Adam learning rate (halved when validation stalls for ``patience // 2`` epochs).
        val_fraction: Held-out fraction for early stopping (0: none, train to ``epochs``).
        patience: Stop after this many epochs without a better validation ``L_map``.
        seed: Seed of the split, the initialisation and the batch order.

    Returns:
        The weights of the best validation epoch, and the history: per epoch ``recon``,
        ``match`` (training means), ``val_recon``, ``val_match`` and ``val_match_rel``
        (``val_match`` over the variance of the student's activations).
    """
    if len(teacher) != len(student):
        raise CdistillError(f"Mapping: {len(teacher)} teacher rows but {len(student)} student rows; they must pair up.")
    with torch.random.fork_rng(devices=[]):  # seeded init without resetting the caller's RNG stream
        torch.manual_seed(seed)
        model = MappingAutoencoder(tuple(teacher.shape[1:]), tuple(student.shape[1:]), kind, hidden, resize)
    model = model.to(teacher.device)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(teacher), generator=gen)
    n_val = round(len(teacher) * val_fraction) if val_fraction > 0 else 0
    val_idx, tr_idx = order[:n_val].to(teacher.device), order[n_val:].to(teacher.device)
    s_var = max(float(student[val_idx].var()) if n_val > 1 else float(student.var()), 1e-12)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=max(patience // 2, 1))
    fit = MappingFit(model)
    best, best_state, stale = float("inf"), None, 0
    for epoch in range(epochs):
        model.train()
        perm = tr_idx[torch.randperm(len(tr_idx), generator=gen).to(teacher.device)]
        row = {"epoch": float(epoch), **_train_epoch(model, opt, teacher, student, perm, batch_size)}
        model.eval()
        with torch.no_grad():
            if n_val:
                vr, vm = _terms(model, teacher[val_idx], student[val_idx])
                # Relative to the variance of the student's activations: 0 perfect, 1 no better than the mean.
                row |= {"val_recon": float(vr), "val_match": float(vm), "val_match_rel": float(vm) / s_var}
        fit.history.append(row)
        score = row.get("val_recon", row["recon"]) + row.get("val_match", row["match"])
        sched.step(score)
        if score < best - 1e-12:
            best, stale, fit.best_epoch = score, 0, epoch
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if n_val and stale >= patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    log.info("mapping %s: best epoch %d of %d, %s", model.kind, fit.best_epoch, len(fit.history), fit.history[fit.best_epoch])
    return fit
