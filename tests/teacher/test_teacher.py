"""Teacher stage: frozen teachers (CNN and ViT tokens), one PCA, the mapping, the cache, bad input."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig

import cdistill.teacher.stage as stage_mod
from cdistill.cli.pipeline import ABLATION, variant_config, write_ablation
from cdistill.cli.train import train
from cdistill.errors import CdistillError
from cdistill.teacher.feature_cache import cached_tensors, fingerprint
from cdistill.teacher.mapping import MappingAutoencoder, fit_mapping, fit_pca
from cdistill.teacher.offline import DigitsAutoencoder
from cdistill.teacher.teachers import Teacher, create_teacher, tokens_to_grid

MakeCfg = Callable[..., DictConfig]
TINY_VIT = {"img_size": 28, "patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2, "num_classes": 0}
#: Shrinks a cd_teacher experiment: a tiny offline teacher and a short mapping fit.
SHRINK = ["debug=fdr", "data.max_train_samples=128", "model.teacher.train.images=128",
          "model.teacher.train.epochs=1", "model.teacher.train.width=4", "model.teacher.pca_dims=4",
          "model.teacher.mapping.epochs=3"]


def _images(n: int = 12, seed: int = 0, size: int = 28) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _tiny_cnn_teacher(**kw: Any) -> Teacher:
    return create_teacher("cdistill:digits_ae", "encoder.conv2", model_kwargs={"width": 4}, **kw)


def test_teacher_is_frozen_and_stays_in_eval_mode() -> None:
    teacher = _tiny_cnn_teacher()
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    feats = teacher.features(_images())
    assert feats.shape == (12, 8, 8, 8) and not feats.requires_grad
    assert all(p.grad is None for p in teacher.parameters())


def test_teacher_outside_module_optimizer_and_checkpoint(make_cfg: MakeCfg, monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[Teacher] = []
    real = stage_mod.teacher_from_config

    def spy(cfg: Any) -> Teacher:
        built.append(real(cfg))
        return built[-1]

    monkeypatch.setattr(stage_mod, "teacher_from_config", spy)
    cfg = make_cfg("experiment=color_mnist/cd_teacher", *SHRINK)
    trained: list[Any] = []
    import pytorch_lightning as pl

    monkeypatch.setattr(pl.Trainer, "fit", _recording_fit(pl.Trainer.fit, trained))
    metrics = train(cfg)
    assert len(built) == 1 and "cav/acc_teacher" in metrics and "cav/acc_student" in metrics
    teacher = built[0]
    module, optimizers = trained[0]
    teacher_params = {id(p) for p in teacher.parameters()}
    in_optim = {id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]}
    assert teacher_params and not teacher_params & in_optim
    assert not teacher_params & {id(p) for p in module.parameters()}
    assert not any("teacher" in k for k in module.state_dict())
    assert not teacher.training and all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def _recording_fit(fit: Callable[..., Any], out: list[Any]) -> Callable[..., Any]:
    def wrapped(self: Any, model: Any, *args: Any, **kw: Any) -> Any:
        result = fit(self, model, *args, **kw)
        out.append((model, list(self.optimizers)))
        return result

    return wrapped


def test_vit_tokens_become_a_grid() -> None:
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)  # class token + 2x2 patches
    grid = tokens_to_grid(tokens)
    assert grid.shape == (2, 3, 2, 2)
    assert torch.equal(grid[:, :, 0, 1], tokens[:, 2])  # the class token is dropped
    with pytest.raises(CdistillError, match="square patch grid"):
        tokens_to_grid(torch.zeros(1, 7, 3))


def test_vit_teacher_features() -> None:
    teacher = create_teacher("timm:vit_tiny_patch16_224", "blocks.1", model_kwargs=TINY_VIT, image_size=28)
    assert teacher.features(_images(4)).shape == (4, 16, 7, 7)


@pytest.mark.parametrize(
    ("overrides", "kind"),
    [
        ([], "cnn"),
        (["model.teacher.name=timm:vit_tiny_patch16_224", "model.teacher.layer=blocks.1",
          "model.teacher.mean=[0.5,0.5,0.5]", "model.teacher.std=[0.5,0.5,0.5]",
          "+model.teacher.model_kwargs={img_size:28,patch_size:4,embed_dim:16,depth:2,num_heads:2,num_classes:0}",
          "model.teacher.mapping.resize=true",
          # A random tiny ViT's mapped CAVs sit near the gate; with it the chroma term could keep
          # fewer CAVs than its rank, which is a clear error since the rank check.
          "model.concepts.min_accuracy=0.0"], "vit"),
    ],
)
def test_teacher_experiment_fast_dev_run(make_cfg: MakeCfg, overrides: list[str], kind: str) -> None:
    cfg = make_cfg("experiment=color_mnist/cd_teacher", *SHRINK, *overrides)
    metrics = train(cfg)
    assert 0.0 <= metrics["test/acc"] <= 1.0
    assert 0.0 <= metrics["cav/acc_teacher"] <= 1.0 and 0.0 <= metrics["cav/acc_student"] <= 1.0
    assert {"teacher/map_recon", "teacher/map_match", "teacher/map_val_recon", "teacher/map_val_match"} <= set(metrics)


def test_mapping_learns_a_planted_linear_map() -> None:
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(2000, 16, generator=gen)
    s = t @ torch.randn(16, 24, generator=gen)
    fit = fit_mapping(t, s, epochs=300, lr=1e-2, patience=20)
    rel = (fit.model.map(t) - s).norm() / s.norm()
    assert rel < 1e-2
    assert {"recon", "match", "val_recon", "val_match"} <= set(fit.history[0])


def test_mapping_learns_a_planted_conv_map() -> None:
    gen = torch.Generator().manual_seed(1)
    t = torch.randn(600, 6, 4, 4, generator=gen)
    s = torch.einsum("nchw,ck->nkhw", t, torch.randn(6, 9, generator=gen))
    fit = fit_mapping(t, s, epochs=300, lr=1e-2, patience=20)
    assert isinstance(fit.model.encode, torch.nn.Conv2d)
    assert (fit.model.map(t) - s).norm() / s.norm() < 1e-2


def test_mapping_layers_follow_the_grids() -> None:
    assert isinstance(MappingAutoencoder((8, 4, 4), (6, 8, 8)).encode, torch.nn.ConvTranspose2d)
    assert isinstance(MappingAutoencoder((8, 8, 8), (6, 4, 4)).encode, torch.nn.Conv2d)
    assert isinstance(MappingAutoencoder((8, 4, 4), (6,)).encode, torch.nn.Linear)
    z, back = MappingAutoencoder((8, 7, 7), (6, 8, 8), resize=True)(torch.randn(2, 8, 7, 7))
    assert z.shape == (2, 6, 8, 8) and back.shape == (2, 8, 7, 7)


def test_unjoinable_shapes_name_both_and_the_key() -> None:
    with pytest.raises(CdistillError, match=r"\(8, 7, 7\).*\(6, 8, 8\).*model\.teacher\.mapping\.resize"):
        MappingAutoencoder((8, 7, 7), (6, 8, 8))
    with pytest.raises(CdistillError, match=r"model\.teacher\.mapping\.kind=linear"):
        MappingAutoencoder((8,), (6, 8, 8), kind="conv")


def test_one_pca_basis_serves_all_concept_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    real = stage_mod.fit_pca

    def spy(sets: Any, dims: int, **kw: Any) -> Any:
        calls.append(sorted(sets))
        return real(sets, dims, **kw)

    monkeypatch.setattr(stage_mod, "fit_pca", spy)
    monkeypatch.setattr(stage_mod, "teacher_from_config", lambda cfg: _tiny_cnn_teacher())
    images = {"a": _images(10, 1), "b": _images(10, 2), "blank": torch.zeros(1, 3, 28, 28, dtype=torch.uint8)}
    student = {k: torch.randn(len(v), 5, 8, 8) for k, v in images.items()}
    cfg = {"name": "cdistill:digits_ae", "layer": "encoder.conv2", "pca_dims": 3, "mapping": {"epochs": 2}}
    result = stage_mod.map_concept_sets(cfg, images, student, exclude=("blank",))
    assert calls == [["a", "b"]]  # once, over all sets together, the reference image left out
    assert result.pca is not None and result.pca.components.shape == (8, 3)
    assert set(result.mapped) == {"a", "b", "blank"} and result.mapped["a"].shape == (10, 5, 8, 8)
    # The shared basis is not a per-set basis.
    feats = {k: torch.randn(50, 8) + 3 * i for i, k in enumerate(("a", "b"))}
    both, only_a = fit_pca(feats, 2), fit_pca({"a": feats["a"]}, 2)
    assert not torch.allclose(both.components.abs(), only_a.components.abs(), atol=1e-3)


def test_cache_reused_and_invalidated(tmp_path: Path) -> None:
    calls: list[int] = []

    def compute() -> dict[str, torch.Tensor]:
        calls.append(1)
        return {"a": torch.ones(2, 3)}

    model = torch.nn.Linear(3, 2)
    key = fingerprint(model, "layer", {"a": _images(2)})
    out = cached_tensors(tmp_path, "teacher", key, compute)
    again = cached_tensors(tmp_path, "teacher", fingerprint(model, "layer", {"a": _images(2)}), compute)
    assert len(calls) == 1 and torch.equal(out["a"], again["a"])
    changed = [
        fingerprint(model, "other_layer", {"a": _images(2)}),
        fingerprint(model, "layer", {"a": _images(2, seed=5)}),
        fingerprint(model, "layer", {"b": _images(2)}),
    ]
    with torch.no_grad():
        model.weight[0, 0] += 1e-3
    changed.append(fingerprint(model, "layer", {"a": _images(2)}))
    assert len({key, *changed}) == 5
    # 0-dim tensors (BatchNorm's num_batches_tracked) and bools hash too
    assert fingerprint(torch.nn.BatchNorm2d(2), torch.tensor(True)) != fingerprint(torch.nn.BatchNorm2d(3))
    for k in changed:
        cached_tensors(tmp_path, "teacher", k, compute)
    assert len(calls) == 5


def test_teacher_stage_uses_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    teacher = _tiny_cnn_teacher()
    calls: list[int] = []
    real = Teacher.features

    def counting(self: Teacher, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        calls.append(1)
        return real(self, images, batch_size)

    monkeypatch.setattr(Teacher, "features", counting)
    monkeypatch.setattr(stage_mod, "teacher_from_config", lambda cfg: teacher)
    images = {"a": _images(8, 1), "b": _images(8, 2)}
    student = {k: torch.randn(8, 5, 8, 8) for k in images}
    cfg = {"name": "x", "layer": "encoder.conv2", "pca_dims": 0, "mapping": {"epochs": 1}, "cache_dir": str(tmp_path)}
    stage_mod.map_concept_sets(cfg, images, student)
    stage_mod.map_concept_sets(cfg, images, student)
    assert len(calls) == 2  # two sets, computed once
    stage_mod.map_concept_sets(cfg, {"a": _images(8, 3), "b": images["b"]}, student)
    assert len(calls) == 4


def test_bad_teacher_input(tmp_path: Path) -> None:
    with pytest.raises(CdistillError, match=r"does not exist.*model\.teacher\.checkpoint_path"):
        _tiny_cnn_teacher(checkpoint_path=str(tmp_path / "missing.pt"))
    wrong = tmp_path / "wrong.pt"
    torch.save(DigitsAutoencoder(width=8).state_dict(), wrong)
    with pytest.raises(CdistillError, match="does not match the teacher architecture"):
        _tiny_cnn_teacher(checkpoint_path=str(wrong))
    fixed = _tiny_cnn_teacher(resize=False)
    with pytest.raises(CdistillError, match=r"\(32, 32\).*28x28.*model.teacher.resize"):
        fixed.features(_images(2, size=32))
    with pytest.raises(CdistillError, match="Unknown layer"):
        create_teacher("cdistill:digits_ae", "encoder.conv9", model_kwargs={"width": 4})
    with pytest.raises(CdistillError, match=r"model\.teacher\.cav_space"):
        stage_mod.check_teacher_config({"name": "x", "layer": "y", "cav_space": "both"})


def test_offline_teacher_trains_and_is_cached(tmp_path: Path) -> None:
    from cdistill.teacher.offline import bias_free_images, ensure_digits_ae

    imgs = bias_free_images(64, 0)
    assert imgs.shape == (64, 3, 28, 28) and torch.equal(imgs, bias_free_images(64, 0))
    settings = {"images": 32, "epochs": 1, "width": 4}
    path = ensure_digits_ae(tmp_path, settings)
    mtime = path.stat().st_mtime_ns
    assert ensure_digits_ae(tmp_path, settings) == path and path.stat().st_mtime_ns == mtime
    assert ensure_digits_ae(tmp_path, {**settings, "epochs": 2}) != path
    teacher = create_teacher("cdistill:digits_ae", "encoder.conv1", checkpoint_path=str(path), model_kwargs={"width": 4})
    assert teacher.features(_images(2)).shape == (2, 4, 24, 24)


def test_ablation_variants_and_table(tmp_path: Path) -> None:
    cfg = DictConfig({"model": {"teacher": {"name": "t"}, "form": "prototype"}})
    off = variant_config(cfg, teacher=False, prototypes=False)
    assert off.model.teacher is None and off.model.form == "logit" and cfg.model.teacher is not None
    runs = {name: {"strict/test/acc": 0.1 * i, "cav/acc_student": 1.0} for i, name in enumerate(ABLATION.values())}
    per_seed = [{"base": {"strict/test/acc": 0.05}, "ablation": runs}]
    text = write_ablation(per_seed, ["strict"], tmp_path, "task")
    assert "| no teacher, no prototypes | 30.00 ± 0.00 |" in text and (tmp_path / "pipeline_ablation.md").is_file()


@pytest.mark.slow
@pytest.mark.core
def test_teacher_stage_under_ddp_sim_matches_single_process(tmp_path: Path) -> None:
    """2 gloo processes hold the same teacher-space CAVs as 1 process (the teacher itself is
    never wrapped by DDP: it is not a submodule)."""
    from conftest import one_sgd_step_run

    shrink = [s for s in SHRINK if s not in ("debug=fdr", "data.max_train_samples=128")]
    single = one_sgd_step_run(tmp_path, "single", "color_mnist/cd_teacher", ["trainer=cpu", "data.batch_size=32", *shrink])
    ddp = one_sgd_step_run(tmp_path, "ddp", "color_mnist/cd_teacher", ["trainer=ddp_sim", "data.batch_size=16", *shrink])
    assert not any("teacher" in k for k in ddp)
    for key in ("cavs.vectors", "prototypes.centers", "cav_index"):
        assert torch.allclose(single[key].double(), ddp[key].double(), atol=1e-5), key


def test_dino_config_composes_and_names_a_missing_checkpoint(make_cfg: MakeCfg, tmp_path: Path) -> None:
    from cdistill.cli.train import instantiate

    cfg = make_cfg("experiment=color_mnist/cd_teacher", "teacher@model.teacher=dino_vitb8",
                   f"model.teacher.checkpoint_path={tmp_path / 'dino_vitb8.pth'}")
    assert cfg.model.teacher.name == "timm:vit_base_patch8_224.dino" and cfg.model.teacher.pca_dims == 64
    with pytest.raises(CdistillError, match=r"dino_vitb8\.pth.*does not exist.*model\.teacher\.checkpoint_path"):
        instantiate(cfg.model)


def test_mapping_fit_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    fit_mapping(torch.randn(20, 4, generator=torch.Generator().manual_seed(0)),
                torch.randn(20, 3, generator=torch.Generator().manual_seed(1)), epochs=2, seed=7)
    assert torch.equal(torch.rand(3), expected)
