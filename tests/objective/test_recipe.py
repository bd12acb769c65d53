"""The default concept recipe (docs/methods.md §2.10): one set of settings for every bias family,
and the distill task computes its terms end to end."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from cdistill.errors import CdistillError

MakeCfg = Callable[..., DictConfig]
MNIST_FAMILIES = ("color_mnist", "texture_mnist", "decoy_mnist", "marker_mnist")
#: What an experiment may set on top of model=cd: the data-dependent keys (student channels,
#: concept spec and the bias term). Anything else would be per-family tuning.
FAMILY_KEYS = {("student", "name"), ("student", "in_chans"), ("concepts", "spec"), ("concepts", "terms")}


def _leaves(cfg: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    if isinstance(cfg, dict):
        out: dict[tuple[str, ...], Any] = {}
        for k, v in cfg.items():
            out |= _leaves(v, (*prefix, str(k)))
        return out
    return {prefix: cfg}


def _model(make_cfg: MakeCfg, *overrides: str) -> dict[tuple[str, ...], Any]:
    cfg = make_cfg(*overrides)
    return _leaves(OmegaConf.to_container(cfg.model, resolve=False))


@pytest.mark.parametrize("family", MNIST_FAMILIES)
def test_family_cd_is_the_default_recipe(make_cfg: MakeCfg, family: str) -> None:
    """experiment=<family>/cd changes nothing of model=cd but the family's data-dependent keys,
    and the trainer budget is the same for every family."""
    recipe = _model(make_cfg, "model=cd")
    family_model = _model(make_cfg, f"experiment={family}/cd")
    differing = {k for k in recipe.keys() | family_model.keys() if recipe.get(k) != family_model.get(k)}
    assert differing <= FAMILY_KEYS, f"{family}/cd tunes {sorted(differing - FAMILY_KEYS)}"
    assert make_cfg(f"experiment={family}/cd").trainer.max_epochs == 10
    assert recipe[("lambda_o",)] > 0 and recipe[("lambda_s",)] > 0 and recipe[("lambda_c",)] == 0


def test_folder_cd_uses_the_recipe(make_cfg: MakeCfg, tmp_path: Path) -> None:
    """The private families come in through data=folder: experiment=folder/cd is the recipe too."""
    recipe = _model(make_cfg, "model=cd")
    folder = _model(make_cfg, "experiment=folder/cd", f"data.root={tmp_path}")
    for key in ("layer", "lambda_c", "lambda_o", "lambda_s", "outputs", "counterfactual"):
        mine = {k: v for k, v in folder.items() if k[0] == key}
        assert mine == {k: v for k, v in recipe.items() if k[0] == key}, key


def test_recipe_terms_train_the_student(make_cfg: MakeCfg) -> None:
    """Both concept-image terms are computed, finite, logged by name, and reach the student's weights."""
    cfg = make_cfg("experiment=marker_mnist/cd", "data.max_train_samples=64", "model.outputs.per_set=2")
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    module = instantiate(cfg.model, _recursive_=False)
    with pytest.raises(CdistillError, match="load_concept_images"):
        module.compute_losses(next(iter(dm.train_dataloader())))
    module.load_concept_images(dm)
    batch = next(iter(dm.train_dataloader()))
    out = module.compute_losses(batch)
    assert {"task", "output", "counterfactual", "loss"} <= out.keys() and "concept" not in out
    assert all(bool(torch.isfinite(out[k])) for k in ("output", "counterfactual", "loss"))
    expected = out["task"] + 10.0 * out["output"] + 1.0 * out["counterfactual"]
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    out["counterfactual"].backward()
    assert module.student.conv1.weight.grad is not None and module.student.conv1.weight.grad.abs().sum() > 0


def test_counterfactual_layer_must_exist(make_cfg: MakeCfg) -> None:
    cfg = make_cfg("experiment=marker_mnist/cd", "model.counterfactual.layers=[input:position,pool9]")
    with pytest.raises(Exception, match=r"Unknown layer 'pool9'\. Close names: pool2, pool1"):
        instantiate(cfg.model, _recursive_=False)  # Hydra wraps the CdistillError


def test_auto_layer_is_the_stem() -> None:
    from torch import nn

    from cdistill.models.layers import resolve_layer, stem_layer
    from cdistill.models.students import create_student

    assert stem_layer(create_student("mnist_cnn")) == "pool1"
    assert stem_layer(create_student("torchvision:resnet18", num_classes=2)) == "maxpool"
    assert stem_layer(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3))) == "1"  # no pooling
    assert resolve_layer(create_student("mnist_cnn"), "conv2") == "conv2"
    with pytest.raises(CdistillError, match="no activation module"):
        stem_layer(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()))


def test_pipeline_warns_when_the_concept_loss_is_satisfied_but_nothing_moved() -> None:
    from cdistill.cli.report_warnings import stalled_warnings

    base = {"val_reversed/acc_conflicting": 0.10}
    dodged = {"seed": 0, "base": base, "cd": {"train/concept": 0.003, "val_reversed/acc_conflicting": 0.105}}
    moved = {"seed": 1, "base": base, "cd": {"train/concept": 0.003, "val_reversed/acc_conflicting": 0.40}}
    unsatisfied = {"seed": 2, "base": base, "cd": {"train/output": 0.9, "val_reversed/acc_conflicting": 0.10}}
    warnings = stalled_warnings([dodged, moved, unsatisfied])
    assert len(warnings) == 1 and warnings[0].startswith("seed 0: train/concept = 0.0030")
    fooled = {"seed": 3, "base": base, "cd": {"train/probe": 0.01, "val_reversed/acc_conflicting": 0.11}}
    assert stalled_warnings([fooled])[0].startswith("seed 3: train/probe = 0.0100")
