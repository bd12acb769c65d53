"""ConceptDistillModule: the objective without a Trainer, artefacts in checkpoints, DDP-sim."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import one_sgd_step_run

from cdistill.errors import CdistillError
from cdistill.tasks.distill import ConceptDistillModule
from datamodules import ColorMNISTDataModule

ROOT = Path(__file__).resolve().parents[2]
TERMS = [{"concept": "color_{y}", "negative": "grey"}]


def make(**kw: Any) -> ConceptDistillModule:
    args: dict[str, Any] = {
        "layer": "conv2",
        "student": {"name": "mnist_cnn"},
        "optimizer": {"_target_": "torch.optim.Adam", "lr": 1e-3},
        "concepts": {"spec": "concepts/color_mnist.yaml", "terms": TERMS, "min_accuracy": 0.0},
    }
    args.update(kw)
    return ConceptDistillModule(**args)


@pytest.fixture(scope="module")
def dm() -> ColorMNISTDataModule:
    d = ColorMNISTDataModule(max_train_samples=300)
    d.setup("fit")
    return d


def _batch(dm: ColorMNISTDataModule, n: int = 16) -> dict[str, torch.Tensor]:
    ds = dm.split("train")
    items = [ds[i] for i in range(n)]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


@pytest.mark.parametrize(
    ("weights", "terms"),
    [
        ({"lambda_c": 1.0}, {"task", "concept", "concept/color_y"}),
        ({"lambda_c": 0.0, "lambda_p": 0.5}, {"task", "prototype"}),
        ({"lambda_c": 0.0, "lambda_l": 1.0}, {"task", "local"}),
        ({"lambda_c": 1.0, "lambda_p": 0.5, "lambda_l": 1.0, "form": "logit"},
         {"task", "concept", "concept/color_y", "prototype", "local"}),
    ],
)
def test_terms_computed_only_when_weighted(dm: ColorMNISTDataModule, weights: dict[str, Any], terms: set[str]) -> None:
    module = make(**weights)
    module.fit_artefacts(dm)
    out = module.compute_losses(_batch(dm))
    assert set(out) == terms | {"loss", "logits"}
    total = out["task"] + sum(
        weights.get(f"lambda_{k[0]}", 0.0) * out[name]
        for k, name in (("c", "concept"), ("p", "prototype"), ("l", "local"))
        if name in out
    )
    assert torch.allclose(out["loss"], total)
    out["loss"].backward()
    assert module.student.conv1.weight.grad is not None
    assert all(torch.isfinite(v).all() for v in out.values())


def test_concept_gradient_reaches_layers_before_the_concept_layer(dm: ColorMNISTDataModule) -> None:
    module = make(lambda_c=1.0)
    module.fit_artefacts(dm)
    out = module.compute_losses(_batch(dm))
    (g,) = torch.autograd.grad(out["concept"], module.student.conv1.weight)
    assert g.abs().sum() > 0
    out = module.compute_losses(_batch(dm))
    (g_fc,) = torch.autograd.grad(out["concept"], module.student.fc2.weight, allow_unused=True)
    assert g_fc is None  # prototype form: layers after the concept layer get no concept gradient


def test_artefacts_round_trip_bitwise(dm: ColorMNISTDataModule, tmp_path: Path) -> None:
    module = make(lambda_c=1.0, lambda_p=0.1, prototypes={"k": 2})
    module.fit_artefacts(dm)
    path = tmp_path / "m.pt"
    # config-derived buffers stay out of checkpoints (older checkpoints load strictly)
    assert not {"subspace", "subspace_rank"} & set(module.state_dict())
    torch.save(module.state_dict(), path)
    fresh = make(lambda_c=1.0, lambda_p=0.1, prototypes={"k": 2})
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert torch.equal(fresh.cavs.vectors, module.cavs.vectors)
    assert fresh.cavs.concepts == module.cavs.concepts
    assert torch.equal(fresh.prototypes.centers, module.prototypes.centers)
    assert torch.equal(fresh.cav_index, module.cav_index)
    assert bool(fresh.artefacts_fitted)
    batch = _batch(dm)
    assert torch.equal(fresh.compute_losses(batch)["loss"], module.compute_losses(batch)["loss"])


@pytest.mark.parametrize(("layer", "form"), [("conv1", "prototype"), ("conv1", "logit"), ("input", "logit")])
def test_position_mode_fits_channel_cavs(dm: ColorMNISTDataModule, layer: str, form: str) -> None:
    """cav_mode=position: CAVs live in the C-dim channel space of the layer (3 colour channels
    at the input), the colour CAVs pass the gate there, and the loss trains conv1."""
    subspace_terms = [{"concept": "color_{y}", "negative": "grey"},
                      {"concept": "color_{y}", "negative": "grey", "subspace": True, "rank": 2, "name": "colours"}]
    module = make(layer=layer, form=form, lambda_c=1.0, target="margin",
                  concepts={"spec": "concepts/color_mnist.yaml", "terms": subspace_terms, "cav_mode": "position"})
    module.fit_artefacts(dm)
    assert module.cavs.dim == (module.student.conv1.out_channels if layer == "conv1" else 3)
    assert float(module.cavs.accuracies.min()) > 0.7
    out = module.compute_losses(_batch(dm))
    assert {"concept/color_y", "concept/colours"} <= set(out)
    for key in ("concept/color_y", "concept/colours"):
        assert 0 <= out[key].item() <= 1 + 1e-6
    (g,) = torch.autograd.grad(out["concept"], module.student.conv1.weight)
    assert g.abs().sum() > 0


def test_bad_configuration_is_clear() -> None:
    with pytest.raises(CdistillError, match="conv2"):
        make(layer="conv3")
    with pytest.raises(CdistillError, match="terms is empty"):
        make(concepts={"spec": "concepts/color_mnist.yaml", "terms": []})
    with pytest.raises(CdistillError, match="direction"):
        make(concepts={"spec": "x", "terms": [{"concept": "a", "direction": "sideways"}]})
    with pytest.raises(CdistillError, match="cav_mode"):
        make(concepts={"spec": "x", "terms": TERMS, "cav_mode": "pixel"})


def test_unknown_concept_and_gate(dm: ColorMNISTDataModule) -> None:
    module = make(concepts={"spec": "concepts/color_mnist.yaml", "terms": [{"concept": "colour_{y}", "negative": "grey"}]})
    with pytest.raises(CdistillError, match="not in the concept spec"):
        module.fit_artefacts(dm)
    # An impossible gate drops every CAV: a clear error, never a silent no-op loss.
    module = make(concepts={"spec": "concepts/color_mnist.yaml", "terms": TERMS, "min_accuracy": 1.01})
    with pytest.warns(UserWarning, match="not trusted"), pytest.raises(CdistillError, match="accuracy gate"):
        module.fit_artefacts(dm)


def _run(tmp: Path, name: str, extra: list[str]) -> dict[str, torch.Tensor]:
    return one_sgd_step_run(tmp, name, "color_mnist/cd_gradient", ["model.lambda_p=0.1", "model.concepts.min_accuracy=0.0", *extra])


@pytest.mark.slow
@pytest.mark.core
def test_ddp_sim_matches_single_process(tmp_path: Path) -> None:
    """2 gloo processes with batch 16 each == 1 process with batch 32: same CAVs, prototypes
    and, after one SGD step with lr=1, the same update (so the same per-step gradient)."""
    single = _run(tmp_path, "single", ["trainer=cpu", "data.batch_size=32"])
    ddp = _run(tmp_path, "ddp", ["trainer=ddp_sim", "data.batch_size=16"])
    for key in ("cavs.vectors", "prototypes.centers", "cav_index"):
        assert torch.allclose(single[key].double(), ddp[key].double(), atol=1e-6), key
    student = [k for k in single if k.startswith("student.")]
    assert student
    for key in student:
        assert torch.allclose(single[key], ddp[key], atol=1e-5, rtol=1e-4), key


def test_prototype_form_at_a_parameterless_layer_is_an_error(dm: ColorMNISTDataModule) -> None:
    module = make(layer="input", concepts={"spec": "concepts/color_mnist.yaml", "terms": TERMS, "min_accuracy": 0.0,
                                           "cav_mode": "position"})
    module.fit_artefacts(dm)
    with pytest.raises(CdistillError, match=r"form=prototype at layer 'input'.*form=logit"):
        module.compute_losses(_batch(dm))
    module.cfg = dataclasses.replace(module.cfg, form="logit")
    assert torch.isfinite(module.compute_losses(_batch(dm))["concept"])
