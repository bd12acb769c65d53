"""Bad input and nonsense settings stop with one clear CdistillError (issue 11, section 5):
non-finite data, impossible settings, wrong checkpoint files, concept images of another size,
and the console entry points print the message alone."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import yaml
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import DataLoader

from cdistill.cli.train import train
from cdistill.concepts import load_spec
from cdistill.concepts.cav import fit_cav
from cdistill.errors import CdistillError, NonFiniteError
from cdistill.objective.losses import concept_loss
from cdistill.tasks.classifier import ClassifierModule
from cdistill.tasks.distill import ConceptDistillModule
from datamodules import ColorMNISTDataModule

MakeCfg = Callable[..., DictConfig]
ADAM = {"_target_": "torch.optim.Adam", "lr": 1e-3}
TERMS = [{"concept": "color_{y}", "negative": "grey"}]


def _classifier(**kw: Any) -> ClassifierModule:
    return ClassifierModule(student={"name": "mnist_cnn"}, optimizer=kw.pop("optimizer", ADAM), **kw)


def _loader(n: int = 8, bad: slice | None = None, batch_size: int = 4) -> DataLoader[dict[str, torch.Tensor]]:
    """Random 3x28x28 images with NaN written into the samples ``bad`` selects."""
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, 28, 28, generator=gen)
    if bad is not None:
        images[bad, 0, 0, 0] = float("nan")
    items = [{"image": images[i], "label": torch.tensor(i % 10), "bias": torch.tensor(i % 10)} for i in range(n)]
    return DataLoader(items, batch_size=batch_size)  # type: ignore[arg-type]


def _trainer(tmp_path: Path, **kw: Any) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", devices=1, max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kw,
    )


# ----------------------------------------------------------------------------- non-finite values
def test_nan_images_in_training_stop_naming_step_and_split(tmp_path: Path) -> None:
    model = _classifier()
    with pytest.raises(NonFiniteError, match=r"training step 1 \(epoch 0, batch 1\) of split 'train'.*input images"):
        _trainer(tmp_path, limit_val_batches=0).fit(model, train_dataloaders=_loader(bad=slice(5, 6)))


def test_diverged_model_is_named_as_such(tmp_path: Path) -> None:
    model = _classifier()
    with torch.no_grad():
        for p in model.student.parameters():
            p.fill_(float("inf"))
    with pytest.raises(NonFiniteError, match=r"step 0.*images are finite, so the model diverged"):
        _trainer(tmp_path, limit_val_batches=0).fit(model, train_dataloaders=_loader())


def test_on_nonfinite_skip_skips_the_batch(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = _classifier(on_nonfinite="skip")
    with caplog.at_level(logging.WARNING, logger="cdistill.tasks.classifier"):
        _trainer(tmp_path, limit_val_batches=0).fit(model, train_dataloaders=_loader(bad=slice(0, 1)))
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert "Skipped training step 0" in caplog.text
    with pytest.raises(CdistillError, match="on_nonfinite"):
        _classifier(on_nonfinite="ignore")


def test_nan_in_an_intrinsic_training_is_an_error(tmp_path: Path) -> None:
    from cdistill.tasks.intrinsic import IntrinsicModule

    model = IntrinsicModule(student={"name": "iid_unet", "in_chans": 3, "width": 4}, optimizer=ADAM)
    gen = torch.Generator().manual_seed(0)
    items = [{k: torch.rand(3, 16, 16, generator=gen) for k in ("image", "reflectance", "shading")} for _ in range(4)]
    items[2]["image"][0, 0, 0] = float("nan")
    loader: DataLoader[dict[str, torch.Tensor]] = DataLoader(items, batch_size=2)  # type: ignore[arg-type]
    with pytest.raises(NonFiniteError, match=r"training step 1 .*input images hold 1 NaN/Inf"):
        _trainer(tmp_path, limit_val_batches=0).fit(model, train_dataloaders=loader)


def test_nan_images_in_an_eval_split_are_an_error(tmp_path: Path) -> None:
    model = _classifier()
    with pytest.raises(NonFiniteError, match="split 'val', batch 1"):
        _trainer(tmp_path).validate(model, dataloaders=_loader(bad=slice(6, 7)), verbose=False)


def test_concept_loss_refuses_non_finite_gradients() -> None:
    cavs = torch.nn.functional.normalize(torch.randn(2, 6, dtype=torch.float64), dim=1)
    index = torch.tensor([[0, 1]])
    args = (torch.tensor([0, 1, 0]), cavs, index, torch.tensor([False]), torch.tensor([1.0]))
    for value in (float("nan"), float("inf")):
        grads = torch.full((3, 6), value, dtype=torch.float64)
        with pytest.raises(NonFiniteError, match="3 of 3 samples"):
            concept_loss(grads, *args)
    # Saturated (tiny but finite) gradients are still left out quietly: a 0.0 loss, no error.
    loss, _ = concept_loss(torch.full((3, 6), 1e-300, dtype=torch.float64), *args)
    assert float(loss) == 0.0


@pytest.mark.parametrize("solver", ["mean_diff", "logistic"])
def test_fit_cav_names_non_finite_input(solver: str) -> None:
    gen = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(20, 5, generator=gen) + 1, torch.randn(20, 5, generator=gen)
    pos[3, 2] = float("nan")
    with pytest.raises(NonFiniteError, match="concept set 'stripes' at layer 'conv2' has 1 of 20"):
        fit_cav(pos, neg, solver, concept="stripes", layer="conv2")


# ----------------------------------------------------------------------------- nonsense settings
def _distill(**kw: Any) -> ConceptDistillModule:
    args: dict[str, Any] = {
        "layer": "conv2", "student": {"name": "mnist_cnn"}, "optimizer": ADAM,
        "concepts": {"spec": "concepts/color_mnist.yaml", "terms": TERMS, "min_accuracy": 0.0},
    }
    return ConceptDistillModule(**(args | kw))


@pytest.mark.parametrize("name", ["lambda_c", "lambda_p", "lambda_l"])
def test_negative_loss_weight_is_an_error(name: str) -> None:
    with pytest.raises(CdistillError, match=f"model.{name}=-0.5"):
        _distill(**{name: -0.5})


@pytest.mark.parametrize("lr", [0.0, -1e-3])
def test_non_positive_learning_rate_is_an_error(lr: float) -> None:
    with pytest.raises(CdistillError, match=r"model\.optimizer\.lr"):
        _classifier(optimizer={**ADAM, "lr": lr})


def test_endless_training_is_an_error(make_cfg: MakeCfg, monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("started a training with no epoch, step or time limit")

    monkeypatch.setattr(pl.Trainer, "fit", never)
    with pytest.raises(CdistillError, match="trains forever"):
        train(make_cfg("trainer.max_epochs=-1"))


@pytest.fixture(scope="module")
def dm() -> ColorMNISTDataModule:
    d = ColorMNISTDataModule(max_train_samples=200)
    d.setup("fit")
    return d


@pytest.mark.parametrize(("rank", "match"), [(5, "span only 3"), (None, "fills the whole 3-dim space")])
def test_subspace_rank_beyond_the_cav_span_is_an_error(dm: ColorMNISTDataModule, rank: int | None, match: str) -> None:
    """Ten colour CAVs at the 3 input channels span 3 dimensions: a rank above that, or a
    subspace of all 3, holds every gradient (constant loss, no gradient)."""
    term = {"concept": "color_{y}", "negative": "grey", "subspace": True, "rank": rank, "name": "colours"}
    module = _distill(layer="input", form="logit", concepts={
        "spec": "concepts/color_mnist.yaml", "terms": [term], "cav_mode": "position", "min_accuracy": 0.0})
    with pytest.raises(CdistillError, match=match):
        module.fit_artefacts(dm)


# ----------------------------------------------------------------------------- checkpoint files
def _student_pt(tmp_path: Path) -> Path:
    path = tmp_path / "student.pt"
    torch.save(_classifier().student.state_dict(), path)
    return path


def test_text_file_as_ckpt_path(make_cfg: MakeCfg, tmp_path: Path) -> None:
    text = tmp_path / "notes.ckpt"
    text.write_text("hello, not a checkpoint\n")
    with pytest.raises(CdistillError, match=r"ckpt_path '.*notes\.ckpt' is not a PyTorch checkpoint"):
        train(make_cfg("debug=fdr", f"ckpt_path={text}"))


def test_student_pt_as_ckpt_path(make_cfg: MakeCfg, tmp_path: Path) -> None:
    path = _student_pt(tmp_path)
    with pytest.raises(CdistillError, match=r"student.pt' is a plain state dict.*model.student.checkpoint_path"):
        train(make_cfg("debug=fdr", f"ckpt_path={path}"))


def test_checkpoint_of_another_architecture(make_cfg: MakeCfg, tmp_path: Path) -> None:
    other = ClassifierModule(student={"name": "mnist_cnn_gray"}, optimizer=ADAM)
    path = tmp_path / "gray.ckpt"
    torch.save({"pytorch-lightning_version": pl.__version__, "epoch": 3, "state_dict": other.state_dict(),
                "hyper_parameters": dict(other.hparams)}, path)
    with pytest.raises(CdistillError, match=r"gray.ckpt' is a Lightning checkpoint \(epoch 3, student 'mnist_cnn_gray'\) "
                       r"of another model.*shape mismatches"):
        train(make_cfg("debug=fdr", f"ckpt_path={path}"))


def test_text_file_as_student_checkpoint(make_cfg: MakeCfg, tmp_path: Path) -> None:
    text = tmp_path / "weights.pt"
    text.write_text("not weights")
    with pytest.raises(CdistillError, match=r"model\.student\.checkpoint_path '.*weights\.pt' is not a PyTorch checkpoint"):
        train(make_cfg("debug=fdr", f"model.student.checkpoint_path={text}"))


def test_pickled_objects_in_a_checkpoint_are_named(make_cfg: MakeCfg, tmp_path: Path) -> None:
    path = tmp_path / "pickled.ckpt"
    torch.save({"pytorch-lightning_version": pl.__version__, "where": tmp_path}, path)
    with pytest.raises(CdistillError, match=r"pickled\.ckpt' holds pickled Python objects.*PosixPath"):
        train(make_cfg("debug=fdr", f"ckpt_path={path}"))


def test_truncated_checkpoint_is_named(make_cfg: MakeCfg, tmp_path: Path) -> None:
    path = _student_pt(tmp_path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(CdistillError, match=r"student\.pt' is a damaged or truncated"):
        train(make_cfg("debug=fdr", f"model.student.checkpoint_path={path}"))


# ----------------------------------------------------------------------------- concept images
def test_concept_images_of_another_size_are_converted_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "stripes"
    folder.mkdir()
    for i in range(3):
        size = (40, 30) if i else (28, 28)
        Image.fromarray(np.full(size[::-1], 50 * i, dtype=np.uint8), mode="L").save(folder / f"{i}.png")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"image_size": 28, "channels": 3, "sets": {"stripes": {"folder": "stripes"}}}))
    with caplog.at_level(logging.WARNING, logger="cdistill.concepts"):
        for _ in range(2):  # e.g. a CAV refresh: the warning is not repeated
            sets = load_spec(spec)
    assert sets["stripes"].shape == (3, 3, 28, 28)
    warnings = [r.getMessage() for r in caplog.records if "stripes" in r.getMessage()]
    assert len(warnings) == 1
    assert "2 are not 28x28 (e.g. 1.png: 40x30) and were resized to 28x28" in warnings[0]
    assert "3 are not 3-channel RGB (e.g. 0.png: mode L) and were converted to RGB" in warnings[0]


# ----------------------------------------------------------------------------- console entry points
@pytest.mark.parametrize(("entry", "experiment"), [("cdistill.cli.train", "color_mnist/baseline"),
                                                   ("cdistill.cli.pipeline", "color_mnist/cd")])
def test_entry_point_prints_the_message_alone(
    entry: str, experiment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    main = __import__(entry, fromlist=["main"]).main
    argv = [entry, f"experiment={experiment}", "model.student.name=mnist_cnnn", "debug=fdr", f"paths.root_dir={tmp_path}",
            f"hydra.run.dir={tmp_path / 'run'}", "data.num_workers=0"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Unknown student model 'mnist_cnnn'" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(CdistillError, match="mnist_cnnn"):
        main()
