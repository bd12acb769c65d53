"""The reliance layer rule (cdistill.causal.layer_scan and ``measure.reliance.layer=reliance``):
planted models where the layer whose concept subspace the output uses is known."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from cdistill.causal import reliance_layer_scan
from cdistill.errors import CdistillError

MakeCfg = Callable[..., DictConfig]
CONCEPT = torch.tensor([[1.0], [0.0], [0.0], [0.0]])  # channel 0 of a 4-channel map: [d=4, r=1]


class TwoPaths(nn.Module):
    """Maps ``[B, 4, 3, 3]`` through two candidate layers, ``stem`` then ``late``; the head reads
    the mean over positions of ``late``'s channels with weights ``w`` (channel 0, the concept,
    most). With ``bypass`` the concept channel reaches ``late`` from the input, not through
    ``stem``: it is present (and ablatable) at both layers, but only ``late``'s copy is used.
    Without it ``late`` is ``stem``'s output unchanged, so the two layers are interchangeable."""

    def __init__(self, bypass: bool) -> None:
        super().__init__()
        self.bypass = bypass
        self.stem = nn.Identity()
        self.late = nn.Identity()
        self.register_buffer("w", torch.tensor([3.0, 1.0, -1.0, 0.5]))

    def forward(self, x: Tensor) -> Tensor:
        e = self.stem(x)
        concept = x[:, :1] if self.bypass else e[:, :1]
        s = self.late(torch.cat([concept, e[:, 1:]], 1)).mean((2, 3)) @ self.w
        return torch.stack([-s, s], -1)


def _batches(n: int = 200, seed: int = 0) -> list[dict[str, Tensor]]:
    """Maps whose channel 0 carries the label (the concept) and channels 1-3 noise."""
    gen = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 2, (n,), generator=gen)
    x = 0.5 * torch.randn(n, 4, 3, 3, generator=gen)
    x[:, 0] += (2.0 * label - 1.0)[:, None, None]
    return [{"image": x[i : i + 50], "label": label[i : i + 50]} for i in range(0, n, 50)]


def test_the_layer_whose_concept_copy_the_output_uses_is_chosen() -> None:
    model = TwoPaths(bypass=True)
    scan = reliance_layer_scan(model, ["stem", "late"], {"stem": CONCEPT, "late": CONCEPT}, _batches(),
                               space="position", control_seed=1)
    stem, late = scan.scores
    assert scan.layer == "late"
    assert stem.rank == late.rank == 1
    assert stem.ablation_kl == pytest.approx(0.0, abs=1e-9)  # ablatable at the stem, but not used there
    assert late.ablation_kl > 0.5 and late.net_kl > stem.net_kl
    assert stem.control_kl > 0  # a random span at the stem does reach the head: the net is negative
    # The same model with the concept read through the stem: the stem's ablation moves the output as much.
    shared = reliance_layer_scan(TwoPaths(bypass=False), ["stem", "late"], {"stem": CONCEPT, "late": CONCEPT},
                                 _batches(), space="position", control_seed=1)
    assert shared.scores[0].ablation_kl == pytest.approx(late.ablation_kl, rel=1e-5)


def test_a_tie_goes_to_the_earliest_candidate() -> None:
    scan = reliance_layer_scan(TwoPaths(bypass=False), ["stem", "late"], {"stem": CONCEPT, "late": CONCEPT},
                               _batches(), space="position", control_seed=1)
    stem, late = scan.scores
    assert stem.net_kl == late.net_kl and stem.net_kl > 0  # the two layers hold the same activation
    assert scan.layer == "stem"
    reversed_scan = reliance_layer_scan(TwoPaths(bypass=False), ["late", "stem"], lambda layer: CONCEPT,
                                        _batches(), space="position", control_seed=1)
    assert reversed_scan.layer == "late"  # the earliest *candidate*, in the order given


def test_every_candidate_is_listed_and_unmeasurable_ones_are_never_chosen() -> None:
    def subspace(layer: str) -> Tensor:
        if layer == "late":
            raise CdistillError("no CAV can be fitted at 'late'")
        return CONCEPT

    scan = reliance_layer_scan(TwoPaths(bypass=True), ["late", "stem"], subspace, _batches(), space="position")
    assert scan.layer == "stem"
    late = scan.scores[0]
    assert not late.measured and "no CAV can be fitted" in late.error
    data = scan.to_dict()
    assert data["candidates"] == ["late", "stem"] and [s["layer"] for s in data["scores"]] == ["late", "stem"]
    assert data["scores"][1]["net_kl"] == pytest.approx(scan.scores[1].net_kl)
    assert "not measured" in scan.table() and "stem (chosen)" in scan.table()


def test_no_measurable_candidate_is_an_error_that_lists_each_reason() -> None:
    full = torch.eye(4)  # spans the whole layer: no control of the same rank is left
    with pytest.raises(CdistillError, match=r"(?s)could measure no candidate.*stem: The concept subspace spans all"):
        reliance_layer_scan(TwoPaths(bypass=True), ["stem", "late"], {"stem": full}, _batches(), space="position")
    with pytest.raises(CdistillError, match="ablation mode"):
        reliance_layer_scan(TwoPaths(bypass=True), ["stem"], {"stem": CONCEPT}, _batches(), mode="average")
    with pytest.raises(CdistillError, match="No candidate layers"):
        reliance_layer_scan(TwoPaths(bypass=True), [], {}, _batches())


def test_measure_reliance_layer_rule_writes_the_scan_beside_the_measure(make_cfg: MakeCfg, tmp_path: Path) -> None:
    from cdistill.cli.measure import run_measure
    from cdistill.concepts.layer_choice import map_candidates
    from cdistill.models.students import create_student

    path = tmp_path / "trained" / "student.pt"
    path.parent.mkdir(parents=True)
    torch.manual_seed(1)
    student = create_student("mnist_cnn")
    torch.save(student.state_dict(), path)
    cfg = make_cfg("experiment=color_mnist/cd", f"measure.ckpt={path}", "measure.measures=[reliance_layer,reliance]",
                   "measure.reliance.layer=reliance", "measure.reliance.max_inputs=64", "measure.reliance.k=0",
                   "measure.reliance.concept_images=20")
    metrics = run_measure(cfg)
    scan = json.loads((Path(cfg.paths.output_dir) / "reliance_layer.json").read_text())
    expected = map_candidates(student.eval(), torch.zeros(1, 3, 28, 28))
    assert scan["candidates"] == expected and len(expected) >= 2
    nets = [s["net_kl"] for s in scan["scores"]]
    assert scan["layer"] == expected[nets.index(max(nets))]
    assert metrics["reliance_layer/chosen_index"] == expected.index(scan["layer"])
    assert {f"reliance_layer/net_kl/{layer}" for layer in expected} <= set(metrics)
    assert "reliance/ablation_kl" in metrics
