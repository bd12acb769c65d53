"""``cdistill-measure``: per-split and per-group accuracy, TCAV with significance and plots of a
trained student, without training; measures plug in by name."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig
from own_data import write_own_data

from cdistill.cli.measure import (
    MEASURES,
    MeasureContext,
    register_measure,
    run_measure,
    split_accuracy,
)
from cdistill.errors import CdistillError
from cdistill.models.students import create_student

MakeCfg = Callable[..., DictConfig]


def _weights(tmp_path: Path, **kw: int) -> Path:
    path = tmp_path / "trained" / "student.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1)
    torch.save(create_student("mnist_cnn", **kw).state_dict(), path)
    return path


class Constant(torch.nn.Module):
    """Predicts class ``k`` for every image."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.full((len(x),), self.k), 2).float()


def test_split_accuracy_by_group() -> None:
    data = [{"image": torch.zeros(1, 2, 2), "label": torch.tensor(y), "bias": torch.tensor(b)}
            for y, b in ((0, 0), (0, 0), (0, 1), (1, 1), (1, 0), (1, -1))]
    res = split_accuracy(Constant(0), data, 2, 2, torch.device("cpu"))
    assert res["acc"] == pytest.approx(3 / 6)
    assert res["acc_group0_0"] == 1.0 and res["acc_group0_1"] == 1.0 and res["acc_group1_1"] == 0.0
    assert res["acc_worst_group"] == 0.0 and res["acc_group_mean"] == pytest.approx(0.5)
    assert res["acc_aligned"] == pytest.approx(2 / 3) and res["acc_conflicting"] == pytest.approx(1 / 2)


def test_measure_accuracy_of_a_student_file(make_cfg: MakeCfg, tmp_path: Path) -> None:
    path = _weights(tmp_path)
    cfg = make_cfg("experiment=color_mnist/cd", f"measure.ckpt={path.parent}", "measure.measures=[accuracy]",
                   "measure.splits=[test,val]")
    metrics = run_measure(cfg)
    out = Path(cfg.paths.output_dir)
    saved = json.loads((out / "measure.json").read_text())
    assert saved == pytest.approx(metrics)
    assert {"test/acc", "test/acc_worst_group", "test/acc_group_mean", "val/acc_aligned"} <= set(saved)
    assert not any(k.startswith("val_reversed/") for k in saved)  # only the splits asked for
    assert "| test |" in (out / "measure.md").read_text() and (out / "groups.png").is_file()
    # the same numbers as a direct evaluation of those weights
    model = create_student("mnist_cnn", checkpoint_path=str(path)).eval()
    from cdistill.cli.train import instantiate

    dm = instantiate(cfg.data)
    dm.setup("test")
    direct = split_accuracy(model, dm.split("test"), 10, 10, torch.device("cpu"))
    assert saved["test/acc"] == pytest.approx(direct["acc"])


def test_measure_tcav_and_a_plugged_in_measure_on_folder_data(make_cfg: MakeCfg, tmp_path: Path) -> None:
    root = write_own_data(tmp_path / "my_data")

    @register_measure("test_mean_logit")
    def mean_logit(ctx: MeasureContext) -> dict[str, float]:
        images = torch.stack([ctx.datamodule.split("test")[i]["image"] for i in range(4)])
        with torch.no_grad():
            return {"test_mean_logit/value": float(ctx.student(images.to(ctx.device)).mean())}

    path = _weights(tmp_path, num_classes=2, image_size=32)
    cfg = make_cfg("experiment=folder/cd", f"data.root={root}", "data.image_size=32", f"measure.ckpt={path}",
                   "measure.measures=[accuracy,tcav,test_mean_logit]")
    metrics = run_measure(cfg)
    out = Path(cfg.paths.output_dir)
    assert {"tcav", "tcav_p", "tcav_significant", "tcav/bias_0", "tcav_p/bias_1", "test_mean_logit/value"} <= set(metrics)
    assert 0.0 <= metrics["tcav_p/bias_0"] <= 1.0
    scores = json.loads((out / "tcav.json").read_text())
    assert [s["concept"] for s in scores] == ["bias_0", "bias_1"] and (out / "tcav.png").is_file()
    assert "test_mean_logit" in MEASURES


def test_measure_errors_name_the_fix(make_cfg: MakeCfg, tmp_path: Path) -> None:
    with pytest.raises(CdistillError, match=r"measure\.ckpt is not set"):
        run_measure(make_cfg("experiment=color_mnist/cd", "measure.measures=[accuracy]"))
    with pytest.raises(CdistillError, match="Unknown measure 'acuracy'"):
        run_measure(make_cfg("experiment=color_mnist/cd", "measure.measures=[acuracy]"))
    path = _weights(tmp_path, num_classes=2)
    with pytest.raises(CdistillError, match="does not match the student architecture"):
        run_measure(make_cfg("experiment=color_mnist/cd", f"measure.ckpt={path}", "measure.measures=[accuracy]"))
    # another architecture named explicitly: classes read off the weights
    cfg = make_cfg("experiment=color_mnist/cd", f"measure.ckpt={path}", "measure.student=mnist_cnn",
                   "measure.measures=[accuracy]", "measure.splits=[test]")
    assert "test/acc" in run_measure(cfg)


def test_measure_refuses_data_drawn_with_another_seed(make_cfg: MakeCfg, tmp_path: Path) -> None:
    """The splits and cues are drawn from the seed: a student trained with seed 3 measured on
    seed-0 data would be tested on other digits, some of them its training digits."""
    import yaml

    from cdistill.cli.measure import recorded_data_seed

    path = _weights(tmp_path)
    (path.parent / "checkpoints").mkdir()
    config = yaml.safe_dump({"seed": 3, "data": {"seed": 3}})
    torch.save({"cdistill": {"config": config}}, path.parent / "checkpoints" / "last.ckpt")
    assert recorded_data_seed(path) == 3 and recorded_data_seed(path.parent / "checkpoints" / "last.ckpt") == 3
    args = ("experiment=color_mnist/cd", f"measure.ckpt={path}", "measure.measures=[accuracy]", "measure.splits=[test]")
    with pytest.raises(CdistillError, match="Pass seed=3"):
        run_measure(make_cfg(*args))
    assert "test/acc" in run_measure(make_cfg(*args, "seed=3"))
    (path.parent / "checkpoints" / "last.ckpt").unlink()  # nothing recorded: measured as configured
    assert recorded_data_seed(path) is None and "test/acc" in run_measure(make_cfg(*args))
