"""Old import paths, old ``_target_``s and checkpoints written before the subpackages keep working.

``tests/fixtures/cd_380f439.ckpt`` was written by commit 380f439 (the flat layout):
``python train.py experiment=color_mnist/cd model.layer=blocks.1
model.student.name=timm:test_efficientnet trainer.max_epochs=1 +trainer.limit_train_batches=2
+trainer.limit_val_batches=1 +trainer.limit_test_batches=1 data.max_train_samples=300``
(its ``checkpoints/last.ckpt``: a ConceptDistillModule with a CAV bank and prototypes).
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch
from hydra.utils import get_object

from cdistill.tasks.classifier import ClassifierModule
from cdistill.tasks.distill import ConceptDistillModule

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "cd_380f439.ckpt"

#: Every module of the flat layout and where it lives now.
MOVED = {
    "cdistill.artefacts": "cdistill.utils.artefacts",
    "cdistill.buffers": "cdistill.utils.buffers",
    "cdistill.capture": "cdistill.utils.capture",
    "cdistill.cav": "cdistill.concepts.cav",
    "cdistill.checkpoint_files": "cdistill.utils.checkpoint_files",
    "cdistill.checkpointing": "cdistill.utils.checkpointing",
    "cdistill.distill": "cdistill.tasks.distill",
    "cdistill.feature_cache": "cdistill.teacher.feature_cache",
    "cdistill.iid_metrics": "cdistill.tasks.iid_metrics",
    "cdistill.iid_net": "cdistill.models.iid_net",
    "cdistill.intrinsic": "cdistill.tasks.intrinsic",
    "cdistill.loggers": "cdistill.cli.loggers",
    "cdistill.losses": "cdistill.objective.losses",
    "cdistill.mapping": "cdistill.teacher.mapping",
    "cdistill.metrics": "cdistill.tasks.metrics",
    "cdistill.module": "cdistill.tasks.classifier",
    "cdistill.offline_teacher": "cdistill.teacher.offline",
    "cdistill.pipeline": "cdistill.cli.pipeline",
    "cdistill.prototypes": "cdistill.objective.prototypes",
    "cdistill.resolvers": "cdistill.utils.resolvers",
    "cdistill.resources": "cdistill.utils.resources",
    "cdistill.students": "cdistill.models.students",
    "cdistill.tcav": "cdistill.concepts.tcav",
    "cdistill.tcav_report": "cdistill.cli.tcav_report",
    "cdistill.teacher_stage": "cdistill.teacher.stage",
    "cdistill.teachers": "cdistill.teacher.teachers",
    "cdistill.train": "cdistill.cli.train",
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_path_is_the_new_module(old: str) -> None:
    # The shim replaces itself by the moved module: private names and monkeypatching work too.
    assert importlib.import_module(old) is importlib.import_module(MOVED[old])


def test_old_concepts_and_textures_names() -> None:
    from cdistill.concepts import load_spec, preprocess
    from cdistill.concepts.sets import load_spec as new_load_spec
    from cdistill.concepts.textures import make_textures
    from datamodules.color_mnist import PALETTE
    from datamodules.textures import make_textures as old_make_textures

    assert load_spec is new_load_spec and callable(preprocess)
    assert old_make_textures is make_textures
    assert PALETTE.shape == (10, 3)


def test_checkpoint_of_380f439_loads_with_weights_only() -> None:
    model = ConceptDistillModule.load_from_checkpoint(FIXTURE, map_location="cpu", weights_only=True)
    saved = torch.load(FIXTURE, map_location="cpu", weights_only=True)["state_dict"]
    state = model.state_dict()
    tensors = {k: v for k, v in saved.items() if torch.is_tensor(v)}
    assert set(tensors) <= set(state)
    for key, value in tensors.items():
        assert torch.equal(state[key], value), key
    assert model.cavs.vectors.shape[0] == 10  # one CAV per colour class, restored as fitted


def test_checkpoint_of_380f439_student_loads_in_classifier() -> None:
    # The base task reads the same hyper-parameters (student, optimizer) and the student weights.
    hparams = torch.load(FIXTURE, map_location="cpu", weights_only=True)["hyper_parameters"]
    model = ClassifierModule(student=hparams["student"], optimizer=hparams["optimizer"])
    saved = torch.load(FIXTURE, map_location="cpu", weights_only=True)["state_dict"]
    student = {k: v for k, v in saved.items() if k.startswith("student.")}
    model.load_state_dict(student)


def test_old_targets_in_a_380f439_checkpoint_resolve() -> None:
    # The run config stored in the checkpoint names the flat-layout classes.
    config = torch.load(FIXTURE, map_location="cpu", weights_only=True)["cdistill"]["config"]
    targets = set(re.findall(r"_target_: (cdistill\.[\w.]+)", config))
    assert "cdistill.distill.ConceptDistillModule" in targets
    for target in targets:
        assert get_object(target) is not None, target
