"""The group-robust methods (cdistill.robust, cdistill/tasks/{group_robust,jtt,dfr,lff}.py):
their defining behaviour on planted problems, the balanced sampler, the correlated-data option,
and each method end-to-end with debug=fdr on every family."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from own_data import write_own_data

from cdistill.cli.train import train
from cdistill.errors import CdistillError
from cdistill.objective.config import DFRConfig, JTTConfig
from cdistill.robust import METHOD_SUPERVISION, SamplePlan, group_of, supervision_of
from cdistill.robust.groups import GroupTable, balanced_weights
from cdistill.robust.losses import dro_update, generalized_cross_entropy, relative_difficulty
from cdistill.tasks.dfr import DFRModule
from cdistill.tasks.group_robust import GroupDROModule
from cdistill.tasks.jtt import JTTModule
from cdistill.tasks.lff import LfFModule
from datamodules import ColorMNISTDataModule
from datamodules.sampler import PlannedEpochSampler

MakeCfg = Callable[..., DictConfig]
STUDENT = {"name": "mnist_cnn", "num_classes": 10, "in_chans": 3}
ADAM = {"_target_": "torch.optim.Adam", "lr": 1e-3}
METHODS = ("erm", "group_balanced", "reweight", "group_dro", "jtt", "dfr", "lff")


def _color(**kw: object) -> ColorMNISTDataModule:
    dm = ColorMNISTDataModule(**{"max_train_samples": 200, **kw})  # type: ignore[arg-type]
    dm.setup()
    return dm


# --------------------------------------------------------------------------- groups and data
def test_group_of_is_label_times_bias_values_plus_bias() -> None:
    labels, bias = torch.tensor([0, 3, 3, 1]), torch.tensor([0, 7, -1, 2])
    assert group_of(labels, bias, 10).tolist() == [0, 37, -1, 12]


def test_conflicting_fraction_zero_is_todays_data_and_one_is_the_oracle() -> None:
    plain, zero = _color(), _color(conflicting_fraction=0.0)
    for split in plain.split_names:
        assert torch.equal(plain.split(split).images, zero.split(split).images)
    assert bool((plain.split("train").bias == plain.split("train").labels).all())
    assert torch.equal(_color(unbiased=True).split("train").images, _color(conflicting_fraction=1.0).split("train").images)


def test_conflicting_fraction_draws_the_oracles_cues_with_probability_p() -> None:
    low, high = _color(conflicting_fraction=0.2, max_train_samples=2000), _color(conflicting_fraction=0.6, max_train_samples=2000)
    oracle = _color(unbiased=True, max_train_samples=2000).split("train").bias
    labels = low.split("train").labels
    share = {p: float((dm.split("train").bias != labels).float().mean()) for p, dm in ((0.2, low), (0.6, high))}
    for p, s in share.items():
        assert abs(s - p * 0.9) < 0.04, share
    # A random cue of the lower p is one of the oracle's, and stays random at the higher p.
    moved = low.split("train").bias != labels
    assert torch.equal(low.split("train").bias[moved], oracle[moved])
    assert torch.equal(high.split("train").bias[moved], oracle[moved])
    for split in ("val", "val_reversed", "test"):
        assert torch.equal(low.split(split).images, _color().split(split).images)


@pytest.mark.parametrize(("kw", "pattern"), [
    ({"conflicting_fraction": 1.5}, r"data\.conflicting_fraction=1\.5"),
    ({"conflicting_fraction": "lots"}, r"data\.conflicting_fraction='lots'"),
    ({"conflicting_fraction": 0.3, "unbiased": True}, "set one of them"),
    ({"sampler": "balanced"}, r"data\.sampler='balanced'"),
])
def test_bad_data_options_name_the_key(kw: dict, pattern: str) -> None:
    with pytest.raises(CdistillError, match=pattern):
        ColorMNISTDataModule(**kw)


# --------------------------------------------------------------------------- sampler
def test_group_balanced_sampler_draws_groups_uniformly_and_is_a_function_of_seed_and_epoch() -> None:
    # Planted: 3 groups of sizes 600, 60, 6 (labels 0/1, bias 0/1).
    labels = torch.tensor([0] * 600 + [1] * 60 + [1] * 6)
    bias = torch.tensor([0] * 600 + [1] * 60 + [0] * 6)
    weights = balanced_weights(GroupTable(labels, bias), "group", 2, 2)
    plan = SamplePlan.from_weights(weights, 6000)
    sampler = PlannedEpochSampler(plan, seed=3)
    sampler.set_epoch(1)
    drawn = list(sampler)
    counts = Counter(group_of(labels[drawn], bias[drawn], 2).tolist())
    assert sorted(counts) == [0, 2, 3]
    for c in counts.values():  # 2000 expected each; 5 standard deviations
        assert abs(c - 2000) < 5 * math.sqrt(6000 * (1 / 3) * (2 / 3)), counts
    again = PlannedEpochSampler(plan, seed=3)
    again.set_epoch(1)
    assert list(again) == drawn
    again.set_epoch(2)
    assert list(again) != drawn
    # Under DDP the ranks share out the one global draw.
    ranks = [PlannedEpochSampler(plan, seed=3, num_replicas=2, rank=r) for r in (0, 1)]
    for r in ranks:
        r.set_epoch(1)
    merged = [i for pair in zip(*(list(r) for r in ranks), strict=True) for i in pair]
    assert merged == drawn


def test_class_balanced_weights_ignore_the_bias() -> None:
    table = GroupTable(torch.tensor([0, 0, 0, 1]), torch.tensor([0, 1, -1, 1]))
    w = balanced_weights(table, "class", 2, 2)
    assert torch.allclose(w, torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0], dtype=torch.float64))


def test_absent_groups_are_logged_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    table = GroupTable(torch.tensor([0, 1]), torch.tensor([0, 1]))
    with caplog.at_level("INFO"):
        w = balanced_weights(table, "group", 2, 2)
    assert w.tolist() == [1.0, 1.0]
    assert "2 of 4 (label, bias) groups have no training sample" in caplog.text


# --------------------------------------------------------------------------- GroupDRO
def test_dro_update_moves_weight_to_the_highest_loss_group() -> None:
    q = torch.tensor([0.5, 0.5, 0.0])
    new = dro_update(q, torch.tensor([0.1, 2.0, 9.0]), torch.tensor([True, True, False]), eta=0.5)
    assert new[1] > 0.5 > new[0] and new[2] == 0 and abs(float(new.sum()) - 1) < 1e-6
    assert torch.allclose(new[:2], torch.softmax(torch.tensor([0.05, 1.0]), 0))


def test_group_dro_weights_move_towards_the_worst_group_on_a_planted_problem() -> None:
    """Group (0, 0): one constant image labelled 0 (easy). Groups (1, 1) and (2, 1): the same
    noise images, labelled 1 in one and 2 in the other, so no model gets their loss below
    log 2: the weight must leave the easy group for them."""
    torch.manual_seed(0)
    module = GroupDROModule(group_dro={"eta": 0.1}, student=STUDENT, optimizer=ADAM)
    noise = torch.randn(16, 3, 28, 28)
    images = torch.cat([torch.ones(32, 3, 28, 28), noise, noise])
    labels = torch.tensor([0] * 32 + [1] * 16 + [2] * 16)
    bias = torch.tensor([0] * 32 + [1] * 32)
    module.adopt_train_groups(GroupTable(labels, bias))
    easy, hard = 0, [1 * 10 + 1, 2 * 10 + 1]
    assert torch.allclose(module.group_weights[[easy, *hard]], torch.full((3,), 1 / 3))
    assert float(module.group_weights.sum()) == pytest.approx(1.0)
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)
    module.train()
    history = []
    for _ in range(40):
        opt.zero_grad()
        out = module.compute_losses({"image": images, "label": labels, "bias": bias})
        out["loss"].backward()
        opt.step()
        history.append(float(module.group_weights[easy]))
    # It first rises (the random student's loss is highest on the constant image), then falls
    # for good once the easy group is learnt.
    assert history[-1] < 0.1, history
    assert all(b < a for a, b in itertools.pairwise(history[15:])), history
    assert float(module.group_weights[hard].sum()) == pytest.approx(1 - history[-1], abs=1e-6)


# --------------------------------------------------------------------------- JTT
def test_jtt_error_set_is_exactly_the_identification_models_training_errors() -> None:
    torch.manual_seed(0)
    train = _color(conflicting_fraction=0.3).split("train")
    module = JTTModule(jtt={"identify_epochs": 1, "upweight": 5}, student=STUDENT, optimizer=ADAM)
    start = {k: v.clone() for k, v in module.student.state_dict().items()}
    ident = module.identify(train, batch_size=32, eval_batch_size=64)
    ident.eval()
    with torch.no_grad():
        preds = torch.cat([ident(train.normalized(slice(i, i + 50))).argmax(1) for i in range(0, len(train), 50)])
    expected = (preds != train.labels).nonzero().flatten()
    got = module.jtt_errors.nonzero().flatten()
    assert 0 < len(got) < len(train)
    assert got.tolist() == expected.tolist()
    # The student itself is untouched (stage 2 starts from its initial weights).
    assert all(torch.equal(start[k], v) for k, v in module.student.state_dict().items())
    # Upsampling through the sampler: each error drawn exactly λ_up times per epoch, the rest once.
    sampler = PlannedEpochSampler(module.train_sample_plan(train), seed=0)
    counts = Counter(list(sampler))
    assert {i for i, c in counts.items() if c == 5} == set(got.tolist())
    assert len(counts) == len(train) and set(counts.values()) <= {1, 5}


def test_jtt_config_is_validated() -> None:
    with pytest.raises(CdistillError, match=r"model\.jtt\.upweight=0"):
        JTTConfig(upweight=0)


# --------------------------------------------------------------------------- DFR
def test_dfr_retrains_only_the_last_layer() -> None:
    torch.manual_seed(0)
    dm = _color()
    module = DFRModule(dfr={"heldout_size": 200, "num_fits": 2}, student=STUDENT, optimizer=ADAM)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    head = module.retrain_last_layer([dm.split("val"), dm.split("val_reversed")], batch_size=256)
    after = module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"student.fc2.weight", "student.fc2.bias"}
    assert head.heldout_size <= 200 and head.l2 in DFRConfig().l2_grid
    # The folded standardisation: the head's logits on the held-out features are the layer's own.
    x = torch.randn(4, 500)
    assert torch.allclose(module.student.fc2(x), x @ head.weight.T + head.bias, atol=1e-5)


class _Attached:
    """The DFR module's view of a datamodule: its split names only."""

    def __init__(self, dm: ColorMNISTDataModule) -> None:
        self.val_names, self.heldout_names, self.split_names = dm.val_names, dm.heldout_names, dm.split_names


def test_dfr_holds_out_random_cue_images_by_default_and_what_is_configured() -> None:
    dm = _Attached(_color())
    assert DFRModule(student=STUDENT, optimizer=ADAM).heldout_splits(dm) == ["val_random"]
    chosen = DFRModule(dfr={"splits": ["val", "val_reversed"]}, student=STUDENT, optimizer=ADAM)
    assert chosen.heldout_splits(dm) == ["val", "val_reversed"]
    dm.heldout_names = []  # data without a random-cue split (the faces, a folder): val ∪ val_reversed
    assert DFRModule(student=STUDENT, optimizer=ADAM).heldout_splits(dm) == ["val", "val_reversed"]
    dm.heldout_names = ["val_random"]
    with pytest.raises(CdistillError, match=r"model\.dfr\.splits entry 'val_random_x'.*val_random"):
        DFRModule(dfr={"splits": ["val_random_x"]}, student=STUDENT, optimizer=ADAM).heldout_splits(dm)
    with pytest.raises(CdistillError, match=r"model\.dfr\.splits entry 'test'"):  # never fitted on a test split
        DFRModule(dfr={"splits": ["test"]}, student=STUDENT, optimizer=ADAM).heldout_splits(dm)
    with pytest.raises(CdistillError, match=r"model\.dfr\.splits=\[\]"):
        DFRConfig(splits=())


def test_dfr_on_random_cue_images_balances_many_groups() -> None:
    torch.manual_seed(0)
    dm = _color()
    module = DFRModule(dfr={"num_fits": 2}, student=STUDENT, optimizer=ADAM)
    head = module.retrain_last_layer([dm.split("val_random")], batch_size=256)
    # ~10 images in each of 100 (label, colour) groups: balanced to the smallest group kept (>= 2).
    assert 100 <= head.heldout_size <= 1000 and head.heldout_size % 10 == 0


def test_dfr_heldout_size_below_the_number_of_groups_is_an_error() -> None:
    dm = _color()
    module = DFRModule(dfr={"heldout_size": 5}, student=STUDENT, optimizer=ADAM)
    with pytest.raises(CdistillError, match=r"model\.dfr\.heldout_size=5 is below the 20 held-out groups"):
        module.retrain_last_layer([dm.split("val"), dm.split("val_reversed")], batch_size=256)


# --------------------------------------------------------------------------- LfF
def test_gce_matches_its_formula_and_lff_weights_are_in_unit_interval() -> None:
    torch.manual_seed(0)
    logits, labels = torch.randn(16, 10), torch.randint(0, 10, (16,))
    p_y = F.softmax(logits, 1)[torch.arange(16), labels]
    assert torch.allclose(generalized_cross_entropy(logits, labels, 0.7), (1 - p_y**0.7) / 0.7)
    # q -> 0 approaches cross-entropy.
    assert torch.allclose(generalized_cross_entropy(logits, labels, 1e-4), F.cross_entropy(logits, labels, reduction="none"), atol=1e-2)
    module = LfFModule(student=STUDENT, optimizer=ADAM)
    module.size_buffers(40)
    module.train()
    batch = {"image": torch.randn(16, 3, 28, 28), "label": labels, "bias": labels, "index": torch.arange(16) * 2}
    for _ in range(2):
        out = module.compute_losses(batch)
    w = relative_difficulty(module.ema_biased[batch["index"]], module.ema_debiased[batch["index"]])
    assert bool(((w >= 0) & (w <= 1)).all()) and abs(float(out["lff_weight"]) - float(w.mean())) < 1e-6
    assert bool((module.ema_biased[batch["index"]] > 0).all()) and float(module.ema_biased[1::2].abs().sum()) == 0
    assert relative_difficulty(torch.tensor([0.0, 3.0]), torch.tensor([0.0, 1.0])).tolist() == [0.5, 0.75]


# --------------------------------------------------------------------------- configs
FAMILIES = {
    "color_mnist": ["experiment=color_mnist/baseline", "data.max_train_samples=256", "data.conflicting_fraction=0.2"],
    "texture_mnist": ["experiment=texture_mnist/baseline", "data.max_train_samples=256", "data.conflicting_fraction=0.2"],
    "decoy_mnist": ["experiment=decoy_mnist/baseline", "data.max_train_samples=256", "data.conflicting_fraction=0.2"],
    "marker_mnist": ["experiment=marker_mnist/baseline", "data.max_train_samples=256", "data.conflicting_fraction=0.2"],
    "faces": ["experiment=faces/baseline", "data.n_train=400", "data.n_valid=16", "data.n_test=16",
              "data.proxy_size=32", "data.image_size=32"],
    "folder": ["experiment=folder/baseline", "data.image_size=24"],
}


def _family_cfg(make_cfg: MakeCfg, tmp_path: Path, family: str, *extra: str) -> DictConfig:
    args = list(FAMILIES[family])
    if family == "faces":
        args.append(f"data.root={tmp_path}/proxy")
    if family == "folder":
        args.append(f"data.root={write_own_data(tmp_path / 'own')}")
    return make_cfg(*args, "debug=fdr", *extra)


#: The default tier runs every method on these; the slow tier on the other families too (~5 min).
FAST_FAMILIES = ("color_mnist", "folder")


@pytest.mark.parametrize("family", [f if f in FAST_FAMILIES else pytest.param(f, marks=pytest.mark.slow)
                                    for f in FAMILIES])
@pytest.mark.parametrize("method", METHODS)
def test_each_method_runs_with_fdr_on_every_family(make_cfg: MakeCfg, tmp_path: Path, method: str, family: str) -> None:
    cfg = _family_cfg(make_cfg, tmp_path, family, f"method={method}")
    metrics = train(cfg)
    for key in ("test/acc", "test/acc_worst_group", "val_reversed/acc"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert math.isfinite(metrics["train/loss"])
    if method == "group_dro":
        assert abs(sum(v for k, v in metrics.items() if k.startswith("dro/q_") and k != "dro/q_max") - 1) < 1e-4
    if method == "dfr":
        assert metrics["test/dfr_heldout_size"] > 0
    if method == "jtt":
        assert (Path(cfg.paths.output_dir) / "jtt_errors.json").is_file()


def test_mismatched_configs_are_cdistill_errors(make_cfg: MakeCfg) -> None:
    with pytest.raises(CdistillError, match=r"method=group_dro .* model\.concepts.*experiment=<family>/baseline"):
        train(make_cfg("experiment=color_mnist/cd", "method=group_dro", "debug=fdr", "data.max_train_samples=64"))
    with pytest.raises(CdistillError, match="both choose the training draw"):
        train(make_cfg("experiment=color_mnist/baseline", "method=jtt", "sampler=group_balanced", "debug=fdr",
                       "data.max_train_samples=64"))


@pytest.mark.parametrize("method", METHODS)
def test_each_method_declares_its_supervision(make_cfg: MakeCfg, method: str) -> None:
    cfg = make_cfg("experiment=color_mnist/baseline", f"method={method}")
    assert supervision_of(cfg) == METHOD_SUPERVISION[method]


def test_concept_methods_declare_concept_images(make_cfg: MakeCfg) -> None:
    for experiment in ("color_mnist/cd", "color_mnist/cd_best", "color_mnist/leace", "color_mnist/rlace"):
        assert supervision_of(make_cfg(f"experiment={experiment}")) == "concept images", experiment
    assert supervision_of(make_cfg("experiment=color_mnist/cd", "model=rrclarc")) == "concept images"
    assert supervision_of(make_cfg("experiment=color_mnist/baseline", "sampler=group_balanced")) == "train group labels"


# --------------------------------------------------------------------------- resume
@pytest.mark.slow
def test_sigkill_resume_is_exact_group_dro(tmp_path: Path) -> None:
    """The group weights are a buffer: a run killed mid-epoch and resumed logs the same weights."""
    from tests.tasks.test_resume import _TINY, kill_and_resume

    full, resumed, _ = kill_and_resume(
        tmp_path, ["experiment=color_mnist/baseline", "method=group_dro", "data.conflicting_fraction=0.2", *_TINY], 6,
        by_path=False)
    assert any(k.startswith("dro/q_") for k in full)
    assert resumed == full
