"""``model.layer=auto``: the candidates, and the choice from the base model's CAV scan."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from cdistill.concepts.layer_choice import (
    LayerChoiceError,
    choose_layer,
    config_layer,
    deciding_terms,
)
from cdistill.models.layers import candidate_layers, stem_layer
from cdistill.models.students import create_student
from cdistill.objective.config import CAVConfig, ConceptTerm

MakeCfg = Callable[..., DictConfig]
TERM = ConceptTerm(concept="cue_{y}", negative="plain", direction="desensitize")


class TwoPath(nn.Module):
    """conv1 -> relu1 -> pool1 (the stem), then conv2 over the stem's output and the half-size
    input -> relu2 -> pool2 -> head. ``conv1`` reads channel 0 only (``stem_sees_cue=False``), so
    a cue drawn in channel 1 reaches ``pool2`` through the skip but never ``pool1``."""

    def __init__(self, stem_sees_cue: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.head = nn.Linear(4 * 2 * 2, 2)
        with torch.no_grad():
            if not stem_sees_cue:
                self.conv1.weight[:, 1] = 0.0
            self.conv1.bias.fill_(0.1)  # every map positive: pool1 keeps what conv1 saw

    def forward(self, x: Tensor) -> Tensor:
        """``[B, 2, 8, 8]`` -> logits ``[B, 2]``."""
        a = self.pool1(self.relu1(self.conv1(x)))
        b = self.pool2(self.relu2(self.conv2(torch.cat([a, F.avg_pool2d(x, 2)], 1))))
        return self.head(b.flatten(1))


def cue_sets(n: int = 100, cue_differs: bool = True, distractor: bool = True) -> dict[str, Tensor]:
    """Sets ``cue_0``, ``cue_1`` (a bright square in channel 1, class 0 top-left and class 1
    bottom-right, at a random offset) and ``plain`` (no square), ``[n, 2, 8, 8]``. Channel 0
    holds uniform noise in every set alike (``distractor``), else zeros. ``cue_differs=False``:
    no set has a square."""
    gen = torch.Generator().manual_seed(1)

    def draw(corner: int | None) -> Tensor:
        x = torch.zeros(n, 2, 8, 8)
        if distractor:
            x[:, 0] = torch.rand(n, 8, 8, generator=gen)
        for i in range(n):
            if corner is not None:
                r, c = (int(v) for v in torch.randint(0, 2, (2,), generator=gen))
                r, c = (r, c) if corner == 0 else (r + 4, c + 4)
                x[i, 1, r : r + 3, c : c + 3] = 1.0 + torch.rand(1, generator=gen).item()
        return x

    if not cue_differs:
        return {"cue_0": draw(None), "cue_1": draw(None), "plain": draw(None)}
    # "mixed": a negative that holds the concept, as random natural images hold either gender
    return {"cue_0": draw(0), "cue_1": draw(1), "plain": draw(None), "mixed": torch.cat([draw(0), draw(1)])}


def test_candidates_are_the_stem_then_later_poolings_and_stages() -> None:
    assert candidate_layers(create_student("mnist_cnn")) == ["pool1", "pool2"]
    assert candidate_layers(create_student("torchvision:resnet18", num_classes=2)) == [
        "maxpool", "layer1", "layer2", "layer3", "layer4"]  # never avgpool or fc
    assert candidate_layers(TwoPath(True)) == ["pool1", "pool2"]

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.act = nn.Linear(4, 4), nn.GELU()

        def forward(self, x: Tensor) -> Tensor:
            return x + self.act(self.fc(x))

    class TinyViT(nn.Module):  # no pooling after its first activation: the blocks are the candidates
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(4, 4)
            self.blocks = nn.Sequential(Block(), Block(), Block())
            self.pool = nn.AdaptiveAvgPool1d(1)
            self.head = nn.Linear(4, 2)

    assert stem_layer(TinyViT()) == "blocks.0.act"
    assert candidate_layers(TinyViT()) == ["blocks.0", "blocks.1", "blocks.2"]
    # A global pooling feeds the head: never the stem.
    head_pool = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    assert stem_layer(head_pool) == "1" and candidate_layers(head_pool) == ["1"]


def test_deciding_terms_are_the_desensitized_cues_with_values() -> None:
    sens = ConceptTerm(concept="digit_{y}", negative="random", direction="sensitize")
    single = ConceptTerm(concept="watermark", negative="random")
    own = ConceptTerm(concept="cue_{y}", negative="plain", layer="conv1")
    assert deciding_terms([TERM, sens, single, own]) == [TERM]
    assert deciding_terms([sens, single, own]) == [sens, single]  # no {y} desensitize term: all without a layer
    assert deciding_terms([own]) == []


def test_stem_that_reads_the_cue_is_chosen_and_scanning_stops_there() -> None:
    choice = choose_layer(TwoPath(stem_sees_cue=True), cue_sets(), [TERM], num_classes=2)
    assert choice.layer == "pool1" and choice.candidates == ("pool1", "pool2")
    assert choice.scanned == ("pool1",)  # fits stop at the first layer that passes
    assert choice.scores[0].passes and choice.scores[0].accuracy >= 0.9


@pytest.mark.parametrize("distractor", [True, False])
def test_stem_that_destroys_the_cue_gives_the_next_candidate(distractor: bool) -> None:
    model = TwoPath(stem_sees_cue=False)
    before = torch.get_rng_state()
    choice = choose_layer(model, cue_sets(distractor=distractor), [TERM], num_classes=2, scan_all=True)
    assert choice.layer == "pool2"
    by = {s.layer: s for s in choice.scores}
    if distractor:  # the stem sees only noise, alike in every set: chance
        assert by["pool1"].accuracy < 0.65 and not by["pool1"].passes
    else:  # the stem's output is the same for every image: no CAV at all, which fails too
        assert by["pool1"].accuracy != by["pool1"].accuracy and not by["pool1"].passes
    assert by["pool2"].passes and len(by["pool2"].values) == 2  # one CAV per class, averaged
    assert "pool1" in choice.table() and "pool2 <" in choice.table()
    assert torch.equal(torch.get_rng_state(), before)
    assert model.training  # the model's own mode is kept
    # Same images, same choice and figures: the scan is deterministic.
    again = choose_layer(model, cue_sets(distractor=distractor), [TERM], num_classes=2, scan_all=True)
    assert json.dumps(again.to_dict()) == json.dumps(choice.to_dict())


def test_a_one_value_term_is_scored_against_its_negative() -> None:
    term = ConceptTerm(concept="cue_0", negative="plain")
    choice = choose_layer(TwoPath(stem_sees_cue=False), cue_sets(), [term], num_classes=2, scan_all=True)
    assert choice.layer == "pool2" and {s.against for s in choice.scores} == {"plain"}
    assert [len(s.values) for s in choice.scores] == [1, 1]


def test_values_decide_even_when_the_negative_holds_the_concept() -> None:
    """cue_k vs a negative half made of cue_k images cannot pass a 0.8 gate at any layer (its
    ceiling is 0.75); the values against each other can, at the stem."""
    term = ConceptTerm(concept="cue_{y}", negative="mixed", direction="desensitize")
    choice = choose_layer(TwoPath(stem_sees_cue=True), cue_sets(), [term], 2, CAVConfig(min_accuracy=0.8))
    assert choice.layer == "pool1" and choice.scores[0].against == "values" and choice.scores[0].accuracy >= 0.9


def test_a_gate_above_every_layer_raises_naming_the_scores_and_the_fix() -> None:
    with pytest.raises(LayerChoiceError, match=r"(?s)no candidate layer.*pool1.*pool2.*model\.layer=.*concept images"):
        choose_layer(TwoPath(stem_sees_cue=True), cue_sets(cue_differs=False), [TERM], num_classes=2)
    # The gate is the config's: a cue every layer reads still fails a gate of 1.01.
    with pytest.raises(LayerChoiceError, match=r"min_accuracy=1\.01"):
        choose_layer(TwoPath(stem_sees_cue=True), cue_sets(), [TERM], 2, CAVConfig(min_accuracy=1.01))


def test_no_deciding_term_is_the_stem_without_a_scan() -> None:
    choice = choose_layer(TwoPath(stem_sees_cue=False), cue_sets(), [], num_classes=2)
    assert choice.layer == "pool1" and choice.scores == ()


def test_train_config_gets_the_chosen_layer_and_writes_it(make_cfg: MakeCfg) -> None:
    from cdistill.cli.train import LAYER_CHOICE_FILE, instantiate, with_auto_layer

    cfg = make_cfg("experiment=color_mnist/cd", "data.max_train_samples=64")
    assert str(cfg.model.layer) == "auto"
    dm = instantiate(cfg.data)
    state = torch.get_rng_state()
    fixed = with_auto_layer(cfg, dm)
    assert torch.equal(torch.get_rng_state(), state)  # the module then initialises as with an explicit layer
    written = json.loads((Path(cfg.paths.output_dir) / LAYER_CHOICE_FILE).read_text())
    assert fixed.model.layer == written["layer"] in written["candidates"] == ["pool1", "pool2"]
    assert str(cfg.model.layer) == "auto"  # the caller's config is left alone
    explicit = make_cfg("experiment=color_mnist/cd", "model.layer=conv2")
    assert with_auto_layer(explicit, dm) is explicit
    assert config_layer(make_cfg("experiment=color_mnist/cd", "model.concepts.terms=[]").model, dm) is None


AUTO_CD = ("experiment=color_mnist/cd", "debug=fdr", "data.max_train_samples=128", "pipeline.seeds=[0]",
           "pipeline.tcav.enabled=false")


def _base(tmp_path: Path) -> Path:
    path = tmp_path / "given" / "student.pt"
    path.parent.mkdir(parents=True)
    torch.save(create_student("mnist_cnn").state_dict(), path)
    return path


def test_preflight_chooses_on_the_base_model_and_fails_early(make_cfg: MakeCfg, tmp_path: Path) -> None:
    from cdistill.cli.pipeline import run_pipeline
    from cdistill.cli.preflight import preflight

    base = _base(tmp_path)
    lines = preflight(make_cfg(*AUTO_CD, f"pipeline.base_ckpt={base}"))
    assert any(line.startswith("model.layer=auto -> 'pool1'") and "color_y" in line for line in lines)
    no_base = preflight(make_cfg(*AUTO_CD))
    assert any("chosen after base training" in line and "['pool1', 'pool2']" in line for line in no_base)
    cfg = make_cfg(*AUTO_CD, f"pipeline.base_ckpt={base}", "model.concepts.min_accuracy=1.01")
    with pytest.raises(LayerChoiceError, match=r"(?s)pool1.*pool2.*Name a layer"):
        run_pipeline(cfg)
    assert not (Path(cfg.paths.output_dir) / "seed0").exists()  # before any training


def test_pipeline_chooses_once_per_seed_and_records_it(make_cfg: MakeCfg, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import cdistill.concepts.layer_choice as lc
    from cdistill.cli.pipeline import run_pipeline
    from cdistill.concepts.layer_choice import recorded_layer

    calls: list[str] = []

    def counted(*args: Any, **kw: Any) -> lc.LayerChoice:
        choice = choose_layer(*args, **kw)
        calls.append(choice.layer)
        return choice

    monkeypatch.setattr(lc, "choose_layer", counted)
    cfg = make_cfg(*AUTO_CD, f"pipeline.base_ckpt={_base(tmp_path)}")
    run_pipeline(cfg)
    assert calls == ["pool1"]  # one scan for the seed: the CD run gets the layer named
    seed = Path(cfg.paths.output_dir) / "seed0"
    choice = json.loads((seed / "layer_choice.json").read_text())
    assert choice["layer"] == "pool1" and choice["scanned"] == ["pool1"]
    assert recorded_layer(seed / "cd" / "student.pt") == "pool1"  # where measures look
