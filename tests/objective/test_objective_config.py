"""The typed settings of the concept objective (cdistill.objective.config) and the CAV fitter
(cdistill.objective.cav_fitter), used without Lightning."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf

from cdistill.concepts.cav import MIN_ACCURACY
from cdistill.errors import CdistillError
from cdistill.objective.cav_fitter import CAVFitter, CAVGateError, difference_rows
from cdistill.objective.config import (
    IID_CAV,
    CAVConfig,
    ConceptsConfig,
    ConceptTerm,
    ErasureConfig,
    Every,
    LocalConfig,
    ObjectiveConfig,
    PrototypeConfig,
    term_name,
)


def _yaml(name: str) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(f"conf/model/{name}.yaml"), resolve=False)
    assert isinstance(cfg, dict)
    return cfg


def test_round_trip_through_plain_dicts() -> None:
    concepts = ConceptsConfig.from_dict({
        "spec": "concepts/color_mnist.yaml", "refresh_every_n_steps": 5, "cav_mode": "position",
        "terms": [{"concept": "color_{y}", "negative": "grey", "classes": [0, 3], "subspace": True, "rank": 2}],
    })
    assert concepts.cav.refresh == Every(steps=5) and concepts.terms[0].classes == (0, 3)
    erasure = ErasureConfig.from_dict({"layers": ["conv1", "conv2"], "method": "leace", "refit_every_n_epochs": 1})
    assert erasure is not None and erasure.refit == Every(epochs=1) and len(erasure.specs) == 2
    for cfg in (concepts, erasure, PrototypeConfig.from_dict({"k": 2, "refresh_every_n_epochs": 3}),
                LocalConfig.from_dict({"mask": "corners", "size": 4})):
        plain = cfg.to_dict()
        # Plain data only (hparams and checkpoints load with weights_only=True).
        assert OmegaConf.to_container(OmegaConf.create(plain)) == plain
        assert type(cfg).from_dict(plain) == cfg
    assert ErasureConfig.from_dict(None) is None


def test_shipped_yaml_parses_and_each_default_lives_once() -> None:
    cd = ConceptsConfig.from_dict({**_yaml("cd")["concepts"], "spec": "x"})
    iid = ConceptsConfig.from_dict(_yaml("iid_unet")["concepts"], base=IID_CAV)
    assert cd.cav == CAVConfig() and cd.cav.min_accuracy == MIN_ACCURACY
    # The intrinsic task differs only where IID_CAV says so.
    assert iid.cav == IID_CAV and iid.cav.solver == "mean_diff" and iid.cav.solver != cd.cav.solver
    changed = {f.name for f in dataclasses.fields(CAVConfig) if getattr(IID_CAV, f.name) != getattr(CAVConfig(), f.name)}
    assert changed == {"solver", "ema"}
    assert PrototypeConfig.from_dict(_yaml("cd")["prototypes"]) == PrototypeConfig()
    assert LocalConfig.from_dict(_yaml("cd")["local"]) == LocalConfig()


def test_every_reads_the_old_keys_and_schedules() -> None:
    assert ConceptsConfig.from_dict({"refit_every_n_steps": 5}).cav.refresh == Every(steps=5)  # IID's name
    assert ConceptsConfig.from_dict({"refresh_every_n_epochs": 2}).cav.refresh == Every(epochs=2)
    every = Every(steps=3, epochs=2)
    assert [s for s in range(10) if every.step_due(s)] == [3, 6, 9]
    assert [e for e in range(5) if every.epoch_due(e)] == [2, 4]
    assert not Every().active and not Every().step_due(0)
    with pytest.raises(CdistillError, match="every_n_steps=-1"):
        Every(steps=-1)


def test_bad_settings_name_the_key() -> None:
    with pytest.raises(CdistillError, match="Close names: solver"):
        ConceptsConfig.from_dict({"solvr": "svm"})
    with pytest.raises(CdistillError, match="CAV solver 'logistc'"):
        CAVConfig(solver="logistc")
    with pytest.raises(CdistillError, match="cav_mode='pixel'"):
        CAVConfig(cav_mode="pixel")
    with pytest.raises(CdistillError, match="test_fraction"):
        CAVConfig(test_fraction=1.0)
    with pytest.raises(CdistillError, match="direction"):
        ConceptTerm("a", direction="sideways")
    with pytest.raises(CdistillError, match="rank"):
        ConceptTerm.from_dict({"concept": "a", "rank": 0})
    with pytest.raises(CdistillError, match=r"lacks \['negative'\]"):
        ConceptTerm.from_dict({"concept": "a"}, required=("concept", "negative"))
    with pytest.raises(CdistillError, match=r"model\.local\.mask='edges'"):
        LocalConfig(mask="edges")
    with pytest.raises(CdistillError, match=r"model\.prototypes\.k=0"):
        PrototypeConfig(k=0)
    with pytest.raises(CdistillError, match="lambda_p=-1"):
        ObjectiveConfig(lambda_p=-1.0)
    with pytest.raises(CdistillError, match=r"model\.target='z'"):
        ObjectiveConfig(target="z")


def test_one_term_name() -> None:
    assert term_name({"concept": "color_{y}"}) == "color_y"
    assert term_name({"concept": "illumination", "branch": "r"}) == "r_illumination"
    assert term_name(ConceptTerm("a", name="chroma")) == "chroma"


def _rows(n: int = 60, d: int = 4, shift: float = 3.0, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(3 * n, d, generator=g)
    return {"c_0": base[:n] + shift * torch.eye(d)[0], "c_1": base[n : 2 * n] + shift * torch.eye(d)[1],
            "random/0": base[2 * n :], "mixed": base[:n]}


def test_fitter_fits_gates_and_indexes_without_lightning() -> None:
    terms = (ConceptTerm("c_{y}"), ConceptTerm("mixed", negative="random", classes=(1,)))
    fitter = CAVFitter(CAVConfig(min_accuracy=0.8), terms, num_classes=2, layer="l")
    with pytest.warns(UserWarning, match="not trusted"):
        bank, index = fitter.fit(lambda layer: _rows())
    assert index.tolist() == [[0, 1], [-1, -1]]  # the "mixed" set is noise: below the gate
    assert len(bank) == 2 and float(bank.accuracies.min()) >= 0.8
    assert bank.vectors[0, 0] > 0.9 and bank.vectors[1, 1] > 0.9  # towards each concept
    strict = CAVFitter(CAVConfig(min_accuracy=1.01), terms[:1], num_classes=2, layer="l")
    with pytest.warns(UserWarning), pytest.raises(CAVGateError, match="accuracy gate"):
        strict.fit(lambda layer: _rows())
    with pytest.raises(CdistillError, match="not in the concept spec"):
        CAVFitter(CAVConfig(), (ConceptTerm("nope"),)).fit(lambda layer: _rows())


def test_fitter_refresh_blends_adopts_and_keeps() -> None:
    terms = (ConceptTerm("c_{y}"),)
    fitter = CAVFitter(CAVConfig(ema=0.5), terms, num_classes=2)
    bank, index = fitter.fit(lambda layer: _rows())
    old = bank.vectors.clone()
    fresh, fresh_index = fitter.fit(lambda layer: _rows(seed=1))
    same, _ = fitter.refresh(bank, index, lambda: (fresh, fresh_index))
    assert same is bank
    expected = torch.nn.functional.normalize(0.5 * old + 0.5 * fresh.vectors, dim=1)
    assert torch.allclose(bank.vectors, expected)
    # Other CAVs passed the gate: adopt the fresh bank, never blend mismatched rows.
    other_index = torch.tensor([[1, 0]])
    adopted, idx = fitter.refresh(bank, index, lambda: (fresh, other_index))
    assert adopted is fresh and idx.tolist() == [[1, 0]]
    # ema = 1 (the intrinsic task): always replaced.
    assert CAVFitter(IID_CAV, terms, 2).blend(bank, index, fresh, fresh_index)[0] is fresh

    def failing() -> tuple:
        raise CAVGateError("all below")

    with pytest.warns(UserWarning, match="keeping the previous CAVs"):
        kept, kept_index = fitter.refresh(bank, index, failing, when="at step 5")
    assert kept is bank and kept_index is index


def test_difference_rows_subsets_positions() -> None:
    diff = torch.randn(4, 3, 5, 5)
    assert difference_rows(diff, CAVConfig(), seed=0).shape == (4, 75)
    rows = difference_rows(diff, CAVConfig(cav_mode="position", max_rows=30), seed=0)
    assert rows.shape == (30, 3)
    assert torch.equal(rows, difference_rows(diff, CAVConfig(cav_mode="position", max_rows=30), seed=0))
