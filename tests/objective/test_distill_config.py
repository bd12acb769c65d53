"""DistillConfig: the distill task's whole config from its keyword arguments, the checks across
settings, and the round trip through the plain hparams (cdistill.objective.distill_config)."""

from __future__ import annotations

import dataclasses
import inspect
import io
from collections.abc import Callable
from typing import Any

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from cdistill.errors import CdistillError
from cdistill.objective.config import (
    DistillConfig,
    Every,
    LocalConfig,
    ObjectiveConfig,
    OutputConfig,
    ReweightConfig,
    RRClArCConfig,
)
from cdistill.tasks.classifier import ClassifierModule
from cdistill.tasks.distill import ConceptDistillModule
from cdistill.teacher.config import TeacherConfig

TERM = {"concept": "color_{y}", "negative": "grey"}
CONCEPTS = {"spec": "concepts/color_mnist.yaml", "terms": [TERM], "min_accuracy": 0.0}
EXPERIMENTS = ["color_mnist/cd", "color_mnist/cd_best", "color_mnist/cd_gradient", "color_mnist/cd_local",
               "color_mnist/cd_teacher", "color_mnist/leace", "color_mnist/rrr"]


def _weights_only(value: Any) -> Any:
    buf = io.BytesIO()
    torch.save(value, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_round_trip_through_plain_hparams() -> None:
    cfg = DistillConfig.from_dict({
        "form": "logit", "target": "random", "lambda_c": 0.5, "lambda_o": 10.0, "lambda_s": 1.0, "lambda_rr": 2.0,
        "concepts": {**CONCEPTS, "cav_mode": "position"}, "prototypes": {"k": 3}, "local": {"mask": "corners"},
        "erasure": {"layers": ["conv1"], "refit_every_n_steps": 4}, "outputs": {"reduce": "image"},
        "counterfactual": {"layers": "conv1:moments"}, "rrclarc": {"target": "logit"}, "probe": {"lr": 1},
        "teacher": {"name": "cdistill:digits_ae", "layer": "encoder.conv2", "cache_max_bytes": None},
        "fit_batch_size": 64,
    })
    assert cfg.concepts.cav.cav_mode == "position" and cfg.prototypes.k == 3 and cfg.probe.lr == 1.0
    assert cfg.erasure is not None and cfg.erasure.refit == Every(steps=4)
    assert cfg.counterfactual.layers == ("conv1:moments",)
    assert cfg.teacher is not None and cfg.teacher.cache_max_bytes is None
    plain = cfg.to_dict()
    # Plain data only: Lightning writes it as hparams, checkpoints load it with weights_only=True.
    assert OmegaConf.to_container(OmegaConf.create(plain)) == plain
    assert _weights_only(plain) == plain
    assert DistillConfig.from_dict(plain) == cfg
    assert DistillConfig.from_dict(_weights_only(plain)) == cfg


def test_nulls_and_empty_parts_take_the_defaults() -> None:
    cfg = DistillConfig.from_dict({"concepts": CONCEPTS, "form": None, "lambda_c": None, "local": None,
                                   "outputs": {"target": None}, "erasure": {}, "teacher": {}})
    assert (cfg.form, cfg.lambda_c) == (DistillConfig.form, DistillConfig.lambda_c)
    assert cfg.local == LocalConfig() and cfg.outputs == OutputConfig()
    assert cfg.erasure is None and cfg.teacher is None


def test_from_kwargs_splits_off_the_classifier_arguments() -> None:
    kwargs = {"lambda_p": 1.0, "concepts": CONCEPTS, "student": {"name": "mnist_cnn"}, "num_classes": 10,
              "optimizer": {"_target_": "torch.optim.Adam", "lr": 1e-3}}
    cfg, rest = DistillConfig.from_kwargs(kwargs)
    assert rest == {k: kwargs[k] for k in ("student", "num_classes", "optimizer")}
    assert cfg.lambda_p == 1.0 and cfg.concepts.spec == CONCEPTS["spec"]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_shipped_experiment_parses_and_loses_no_key(
    experiment: str, make_cfg: Callable[..., DictConfig]
) -> None:
    model = make_cfg(f"experiment={experiment}", "model.concepts.spec=concepts/color_mnist.yaml").model
    kwargs = {str(k): v for k, v in model.items() if not str(k).startswith("_") and k != "layer"}  # _target_ ...
    if "Concept" not in str(model["_target_"]):
        pytest.skip("not the distill task")
    cfg, rest = DistillConfig.from_kwargs(kwargs)
    # Everything that is not the objective's is the classifier's.
    assert set(rest) <= set(inspect.signature(ClassifierModule.__init__).parameters) - {"self"}
    assert DistillConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(("values", "match"), [
    ({"lambda_p": -1.0}, r"lambda_p=-1"),
    ({"lambda_c": float("nan")}, r"lambda_c=nan"),
    ({"form": "cosine"}, r"model\.form='cosine'"),
    ({"target": "z"}, r"model\.target='z'"),
    ({"concepts": {}, "lambda_c": 1.0}, r"model\.lambda_c > 0 but model\.concepts\.terms is empty"),
    ({"concepts": {}, "lambda_c": 0.0, "lambda_o": 1.0}, r"model\.lambda_o > 0 but"),
    ({"concepts": {}, "lambda_c": 0.0, "lambda_adv": 1.0}, r"model\.lambda_adv > 0 but"),
    ({"concepts": {"terms": [{**TERM, "direction": "sensitize"}]}, "lambda_rr": 1.0}, "RR-ClArC only desensitizes"),
    ({"concepts": {**CONCEPTS, "refresh_every_n_steps": 5}, "teacher": {"name": "t", "layer": "l"}},
     "Teacher-space CAVs are fitted once"),
    ({"concepts": CONCEPTS, "probe": {"smoothing": 1.0}}, r"model\.probe\.smoothing"),
    ({"concepts": CONCEPTS, "rrclarc": {"target": "margin"}}, r"model\.rrclarc\.target='margin'"),
    ({"concepts": CONCEPTS, "outputs": {"targt": "uniform"}}, r"key of model\.outputs.*Close names: target"),
    ({"concepts": CONCEPTS, "teacher": {"name": "t"}}, r"model\.teacher\.layer is not set"),
])
def test_bad_settings_are_named(values: dict[str, Any], match: str) -> None:
    with pytest.raises(CdistillError, match=match):
        DistillConfig.from_dict(values)


def test_a_sensitize_term_is_fine_for_the_other_terms() -> None:
    cfg = DistillConfig.from_dict({"concepts": {"terms": [{**TERM, "direction": "sensitize"}]}})
    assert cfg.on("lambda_c") and not cfg.on("lambda_rr")
    assert ObjectiveConfig is DistillConfig  # the old name still builds the loss's settings


def test_choices_are_checked_by_the_shared_post_init() -> None:
    with pytest.raises(CdistillError, match=r"model\.reweight\.by='sample'"):
        ReweightConfig(by="sample")
    with pytest.raises(CdistillError, match=r"model\.local\.mask='edges'"):
        LocalConfig.from_dict({"mask": "edges"})
    assert RRClArCConfig.from_dict({"target": "logit"}).to_dict() == {"target": "logit"}


def _module(**kw: Any) -> ConceptDistillModule:
    return ConceptDistillModule(layer="conv2", student={"name": "mnist_cnn"},
                                optimizer={"_target_": "torch.optim.Adam", "lr": 1e-3}, concepts=CONCEPTS, **kw)


def test_the_module_carries_its_config_and_rebuilds_from_its_hparams() -> None:
    module = _module(lambda_p=0.5, prototypes={"k": 2}, probe=OmegaConf.create({"warm_steps": 3}))
    cfg = module.cfg
    assert (cfg.lambda_p, cfg.prototypes.k, cfg.probe.warm_steps) == (0.5, 2, 3)
    hparams = _weights_only(dict(module.hparams))
    assert {k: hparams[k] for k in cfg.to_dict()} == cfg.to_dict()
    again = ConceptDistillModule(**hparams)
    assert again.cfg == cfg and again.layer == module.layer
    assert list(again.state_dict()) == list(module.state_dict())


def test_setting_the_config_rebuilds_the_objective() -> None:
    module = _module()
    old = module.objective
    module.cfg = dataclasses.replace(module.cfg, form="logit")
    assert module.objective is not old and module.objective.cfg.form == "logit" and module.cfg.form == "logit"
    assert isinstance(module.cfg.teacher, TeacherConfig | None)
