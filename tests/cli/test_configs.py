"""Every option of every config group composes and instantiates."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import hydra.utils
import pytest
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from cdistill.cli.train import instantiate_group

CONF = Path(__file__).resolve().parents[2] / "conf"
MakeCfg = Callable[..., DictConfig]


def options(group: str) -> list[str]:
    root = CONF / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def test_every_group_has_options() -> None:
    for group in ("data", "model", "trainer", "logger", "callbacks", "debug", "experiment", "erasure"):
        assert options(group), group
    assert {"color_mnist/baseline", "decoy_mnist/baseline", "texture_mnist/baseline"} <= set(options("experiment"))
    assert {"cpu", "gpu", "ddp", "ddp_sim"} <= set(options("trainer"))
    assert {"csv", "tensorboard", "wandb"} <= set(options("logger"))


@pytest.mark.parametrize("name", options("data"))
def test_data_options(make_cfg: MakeCfg, name: str) -> None:
    dm = hydra.utils.instantiate(make_cfg(f"data={name}").data)
    assert isinstance(dm, pl.LightningDataModule)
    assert dm.num_channels in (1, 3)


@pytest.mark.parametrize("name", options("model"))
def test_model_options(make_cfg: MakeCfg, name: str) -> None:
    # Concept-distillation models need concept terms, which experiments provide.
    extra = ["experiment=color_mnist/cd"] if name.startswith(("cd", "rrclarc", "adv_probe")) else []
    model = hydra.utils.instantiate(make_cfg(*extra, f"model={name}").model)
    assert isinstance(model, pl.LightningModule)
    assert callable(model.configure_optimizers)


@pytest.mark.parametrize("name", options("trainer"))
def test_trainer_options(make_cfg: MakeCfg, name: str) -> None:
    cfg = make_cfg(f"trainer={name}")
    assert cfg.trainer._target_ == "pytorch_lightning.Trainer"
    if cfg.trainer.accelerator == "gpu":
        pytest.skip("instantiating a GPU trainer needs a GPU (covered by the gpu tests)")
    trainer = hydra.utils.instantiate(cfg.trainer)
    assert isinstance(trainer, pl.Trainer)
    assert trainer.num_devices == cfg.trainer.devices


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["gpu", "ddp"])
def test_gpu_trainer_options(make_cfg: MakeCfg, name: str) -> None:
    trainer = hydra.utils.instantiate(make_cfg(f"trainer={name}", "trainer.devices=1").trainer)
    assert isinstance(trainer, pl.Trainer)


@pytest.mark.parametrize("name", options("logger"))
def test_logger_options(make_cfg: MakeCfg, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    loggers = instantiate_group(make_cfg(f"logger={name}").logger)
    assert loggers and all(isinstance(lg, pl.loggers.Logger) for lg in loggers)
    if name == "wandb":
        assert loggers[0]._offline  # no key configured -> offline, never a login prompt


@pytest.mark.parametrize("name", options("callbacks"))
def test_callback_options(make_cfg: MakeCfg, name: str) -> None:
    # The TCAV callback reads the concept settings of a concept-distillation experiment.
    extra = ["experiment=color_mnist/cd"] if name == "tcav" else []
    cfg = make_cfg(*extra, f"callbacks={name}")
    callbacks = instantiate_group(cfg.callbacks)
    assert all(isinstance(cb, pl.Callback) for cb in callbacks)
    assert (len(callbacks) == 0) == (name == "none")


@pytest.mark.parametrize("name", options("debug"))
def test_debug_options(make_cfg: MakeCfg, name: str) -> None:
    cfg = make_cfg(f"debug={name}")
    assert cfg.trainer.accelerator == "cpu"
    trainer = hydra.utils.instantiate(cfg.trainer)
    assert isinstance(trainer, pl.Trainer)


@pytest.mark.parametrize("name", options("experiment"))
def test_experiment_options_compose(make_cfg: MakeCfg, name: str) -> None:
    cfg = make_cfg(f"experiment={name}")
    missing = sorted(OmegaConf.missing_keys(cfg.model))
    if missing == ["model.student.init_path"]:  # the local ImageNet weights of a ResNet-50 experiment
        with pytest.raises(Exception, match=r"init_path"):
            hydra.utils.instantiate(cfg.model)
        return
    if missing:  # a value the user must give (a local teacher checkpoint): a clear error names it
        assert missing == ["model.teacher.checkpoint_path"], missing
        with pytest.raises(Exception, match=r"model\.teacher\.checkpoint_path is not set"):
            hydra.utils.instantiate(cfg.model)
        return
    model = hydra.utils.instantiate(cfg.model)
    dm = hydra.utils.instantiate(cfg.data)
    from cdistill.models.students import check_input_channels

    check_input_channels(model.student, dm.num_channels)


@pytest.mark.parametrize("bench", ["color_mnist", "decoy_mnist", "texture_mnist"])
@pytest.mark.parametrize("method", options("erasure"))
def test_erasure_group_equals_the_experiment_shortcut(make_cfg: MakeCfg, bench: str, method: str) -> None:
    # experiment=<bench>/<method> is the cd_gradient experiment with the erasure group on top, renamed.
    short = OmegaConf.to_container(make_cfg(f"experiment={bench}/{method}"))
    group = OmegaConf.to_container(make_cfg(f"experiment={bench}/cd_gradient", f"+erasure={method}"))
    assert isinstance(short, dict) and isinstance(group, dict)
    assert short.pop("task_name") == f"{bench}_{method}" and short.pop("tags") == [bench, "erasure", method]
    group.pop("task_name"), group.pop("tags")
    assert short == group
    assert short["model"]["lambda_c"] == 0.0 and short["model"]["erasure"]["layers"] == ["conv1"]
    assert short["pipeline"]["tcav"]["enabled"] is False
