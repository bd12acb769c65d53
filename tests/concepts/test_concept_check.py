"""``python -m cdistill.concepts check``: sets, montages, term pairs, the layer scan, and the
student loader behind ``--model``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from own_data import write_own_data
from PIL import Image
from torch import nn

from cdistill.concepts import load_spec
from cdistill.concepts.__main__ import main
from cdistill.concepts.check import (
    ConceptPair,
    activation_layers,
    activation_note,
    check_pairs,
    montage,
    scan_layers,
    term_pairs,
)
from cdistill.errors import CdistillError
from cdistill.models.load import load_student
from cdistill.models.students import create_student
from cdistill.objective.config import CAVConfig, ConceptTerm


def test_term_pairs_expand_y_per_class_and_dedupe() -> None:
    terms = [ConceptTerm("color_{y}", "grey"), ConceptTerm("color_{y}", "grey", classes=(1,)), ConceptTerm("stripes", "random")]
    pairs = term_pairs(terms, 3)
    assert [(p.concept, p.negative) for p in pairs] == [("color_0", "grey"), ("color_1", "grey"), ("color_2", "grey"),
                                                         ("stripes", "random")]
    assert pairs[0].term == "color_y"


def test_check_pairs_names_every_missing_set_with_close_names() -> None:
    sets = ["color_0", "color_1", "grey", "random/0", "random/1"]
    check_pairs([ConceptPair("color_1", "random", "t")], sets, "s.yaml")  # a pool is a valid negative
    with pytest.raises(CdistillError) as err:
        check_pairs([ConceptPair("colour_1", "gray", "t"), ConceptPair("color_2", "grey", "t")], sets, "s.yaml")
    msg = str(err.value)
    assert "'color_2'" in msg and "'colour_1'" in msg and "'gray' (close: grey)" in msg and "s.yaml" in msg


def test_montage_is_a_grid_of_the_images() -> None:
    images = torch.arange(5 * 3 * 4 * 4, dtype=torch.int64).remainder(256).to(torch.uint8).view(5, 3, 4, 4)
    im = montage(images)
    assert im.size == (3 * 5 + 1, 2 * 5 + 1) and im.mode == "RGB"  # 3 columns, 2 rows, 1 px borders
    assert tuple(im.getpixel((1, 1))) == tuple(int(v) for v in images[0, :, 0, 0])
    assert montage(images[:, :1]).mode == "L"


class FunctionalNet(nn.Module):
    """A student that applies ReLU functionally: no post-activation module to capture."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_activation_layers_and_the_functional_note() -> None:
    cnn = create_student("mnist_cnn")
    assert activation_layers(cnn) == ["relu1", "pool1", "relu2", "pool2", "relu3"]
    assert "relu1" in activation_note(cnn)
    assert "functionally" in activation_note(FunctionalNet())


def test_scan_layers_separates_a_colour_and_flags_the_gate() -> None:
    torch.manual_seed(0)
    red = torch.zeros(40, 3, 28, 28)
    red[:, 0] = 1.0 + 0.1 * torch.randn(40, 28, 28)
    noise = torch.randn(80, 3, 28, 28)
    inputs = {"red": red, "noise/0": noise[:40], "noise/1": noise[40:], "same": noise[:40].clone()}
    model = create_student("mnist_cnn")
    pairs = [ConceptPair("red", "noise", "red"), ConceptPair("same", "noise/0", "same")]
    scores = scan_layers(model, inputs, pairs, ["conv1", "pool1"], CAVConfig(min_accuracy=0.7))
    assert [(s.concept, s.layer) for s in scores] == [("red", "conv1"), ("red", "pool1"), ("same", "conv1"), ("same", "pool1")]
    assert all(s.accuracy > 0.95 and s.passes for s in scores[:2])
    # identical images on both sides: nothing to separate, under the gate
    assert all(s.accuracy < 0.7 and not s.passes for s in scores[2:])
    with pytest.raises(CdistillError, match="Close names"):
        scan_layers(model, inputs, pairs, ["pool3"])


def test_check_command_writes_montages_and_scans_a_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_own_data(tmp_path / "d", n_train=4, n_eval=2)
    spec = tmp_path / "d" / "concepts.yaml"
    assert main(["check", str(spec), "--out", str(tmp_path / "o")]) == 0
    report = json.loads((tmp_path / "o" / "check.json").read_text())
    assert {s["name"]: s["count"] for s in report["sets"]}["bias_1"] == 16
    assert len(list((tmp_path / "o").glob("*.png"))) == 7 and "scan" not in report
    weights = tmp_path / "student.pt"
    torch.save(create_student("mnist_cnn", num_classes=2, image_size=32).state_dict(), weights)
    code = main(["check", str(spec), "--out", str(tmp_path / "o2"), "--model", str(weights), "--student", "mnist_cnn",
                 "--size", "32", "--terms", "bias_{y}:random", "--layers", "conv1", "pool1"])
    assert code == 0
    out = capsys.readouterr().out
    assert "bias_0 vs random" in out and "pool1" in out and "post-activation layers" in out
    scan = json.loads((tmp_path / "o2" / "check.json").read_text())["scan"]
    assert len(scan) == 4 and all(0.0 <= s["accuracy"] <= 1.0 for s in scan)


def test_check_command_fails_with_the_message_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text("sets:\n  stripes: {folder: nowhere}\n")
    assert main(["check", str(spec), "--out", str(tmp_path / "o")]) == 1
    assert "Concept folder" in capsys.readouterr().err
    (tmp_path / "img").mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "img" / f"{i}.png")
    spec.write_text("sets:\n  a: {folder: img}\n")
    assert main(["check", str(spec), "--out", str(tmp_path / "o"), "--terms", "a:b"]) == 1
    assert "'b'" in capsys.readouterr().err


def test_load_student_from_each_kind_of_file(tmp_path: Path) -> None:
    model = create_student("mnist_cnn_gray", num_classes=3)
    (tmp_path / "run").mkdir()
    torch.save(model.state_dict(), tmp_path / "run" / "student.pt")
    with pytest.raises(CdistillError, match="architecture is not in it"):
        load_student(tmp_path / "run")
    loaded = load_student(tmp_path / "run", name="mnist_cnn_gray")  # classes and channels read off the weights
    assert loaded.student["num_classes"] == 3 and loaded.student["in_chans"] == 1
    assert torch.equal(loaded.model.state_dict()["fc2.weight"], model.state_dict()["fc2.weight"])
    by_name = load_student("mnist_cnn_gray", weights=tmp_path / "run" / "student.pt")
    assert torch.equal(by_name.model.state_dict()["conv1.weight"], model.state_dict()["conv1.weight"])
    assert load_student("mnist_cnn").notes  # no weights: said to be untrained
    with pytest.raises(CdistillError, match="does not exist"):
        load_student(tmp_path / "missing.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CdistillError, match="folder without"):
        load_student(tmp_path / "empty")


def test_shipped_specs_pass_the_pairs_check() -> None:
    for spec, concept, negative in (("concepts/color_mnist.yaml", "color_{y}", "grey"),
                                    ("concepts/marker_mnist.yaml", "glyph_{y}", "strokes")):
        sets = list(load_spec(spec))
        check_pairs(term_pairs([ConceptTerm(concept, negative)], 10), sets, spec)


def test_load_student_from_a_cdistill_checkpoint() -> None:
    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "cd_380f439.ckpt"
    state = torch.load(fixture, weights_only=True)["state_dict"]
    loaded = load_student(fixture)  # the architecture and data statistics come from the file
    assert loaded.student["name"] == "timm:test_efficientnet" and loaded.config is not None
    assert loaded.input_mean is not None and torch.equal(loaded.input_mean, state["input_mean"].float())
    own = loaded.model.state_dict()
    assert all(torch.equal(own[k[len("student."):]], v) for k, v in state.items() if k.startswith("student."))
