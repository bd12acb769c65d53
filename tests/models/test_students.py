from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from cdistill.errors import CdistillError
from cdistill.models.students import MnistCNN, check_input_channels, create_student, first_conv


def test_mnist_cnn_shapes_match_the_paper() -> None:
    model = create_student("mnist_cnn")
    assert isinstance(model, MnistCNN)
    assert (model.conv1.in_channels, model.conv1.out_channels, model.conv1.kernel_size) == (3, 20, (5, 5))
    assert (model.conv2.in_channels, model.conv2.out_channels) == (20, 50)
    assert (model.fc1.in_features, model.fc1.out_features, model.fc2.out_features) == (800, 500, 10)
    assert model(torch.zeros(2, 3, 28, 28)).shape == (2, 10)
    gray = create_student("mnist_cnn_gray")
    assert gray.conv1.in_channels == 1
    assert gray(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_timm_and_torchvision_by_name() -> None:
    m = create_student("timm:resnet18", num_classes=7, in_chans=1)
    assert m(torch.zeros(2, 1, 32, 32)).shape == (2, 7)
    bare = create_student("resnet18", num_classes=3)
    assert bare(torch.zeros(2, 3, 32, 32)).shape == (2, 3)
    tv = create_student("torchvision:resnet18", num_classes=5, in_chans=1)
    conv = first_conv(tv)
    assert conv is not None and conv.in_channels == 1
    assert tv(torch.zeros(2, 1, 32, 32)).shape == (2, 5)


def test_unknown_name_lists_close_names() -> None:
    with pytest.raises(CdistillError, match="mnist_cnn"):
        create_student("mnist_cn")
    with pytest.raises(CdistillError, match="resnet18"):
        create_student("torchvision:resnet1")


def test_registered_model_refuses_pretrained() -> None:
    with pytest.raises(CdistillError, match="checkpoint_path"):
        create_student("mnist_cnn", pretrained=True)


def test_checkpoint_path_loads_and_mismatch_is_clear(tmp_path: Path) -> None:
    src = create_student("mnist_cnn")
    path = tmp_path / "w.pt"
    torch.save(src.state_dict(), path)
    dst = create_student("mnist_cnn", checkpoint_path=str(path))
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k])
    # A Lightning-style checkpoint with a "student." prefix also loads.
    torch.save({"state_dict": {f"student.{k}": v for k, v in src.state_dict().items()}}, path)
    dst2 = create_student("mnist_cnn", checkpoint_path=str(path))
    assert torch.equal(dst2.fc2.weight, src.fc2.weight)
    with pytest.raises(CdistillError, match="does not match"):
        create_student("mnist_cnn", num_classes=4, checkpoint_path=str(path))
    with pytest.raises(CdistillError, match="does not exist"):
        create_student("mnist_cnn", checkpoint_path=str(tmp_path / "missing.pt"))


def test_channel_check() -> None:
    check_input_channels(create_student("mnist_cnn"), 3)
    with pytest.raises(CdistillError, match="in_chans=1"):
        check_input_channels(create_student("mnist_cnn"), 1)


def test_mnist_cnn_takes_32_px_when_told() -> None:
    model = create_student("mnist_cnn", image_size=32, num_classes=2)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 2)
    assert model.fc1.in_features == 50 * 5 * 5


def test_mnist_cnn_at_28_px_is_bit_identical_to_the_paper_network() -> None:
    # The pre-change network, rebuilt layer by layer in the same order from the same seed.
    torch.manual_seed(0)
    ref = [torch.nn.Conv2d(3, 20, 5), torch.nn.Conv2d(20, 50, 5), torch.nn.Linear(800, 500), torch.nn.Linear(500, 10)]
    torch.manual_seed(0)
    model = create_student("mnist_cnn")
    for layer, mine in zip(ref, (model.conv1, model.conv2, model.fc1, model.fc2), strict=True):
        assert torch.equal(layer.weight, mine.weight) and torch.equal(layer.bias, mine.bias)


def test_mnist_cnn_names_the_expected_size() -> None:
    with pytest.raises(CdistillError, match=r"built for 28x28 inputs but got 32x32: set model\.student\.image_size=32"):
        create_student("mnist_cnn")(torch.zeros(1, 3, 32, 32))
    with pytest.raises(CdistillError, match="at least 16x16"):
        create_student("mnist_cnn", image_size=12)


def test_train_refuses_data_of_another_size_before_training(make_cfg: Callable[..., DictConfig], tmp_path: Path) -> None:
    from cdistill.cli.train import train
    from tests.datamodules.test_folder import write_dataset

    root = write_dataset(tmp_path / "ds")
    cfg = make_cfg("experiment=color_mnist/baseline", "data=folder", f"data.root={root}", "data.image_size=32",
                   "model.num_classes=2", "model.num_bias_groups=2", "model.student.num_classes=2", "debug=fdr")
    with pytest.raises(CdistillError, match=r"32x32 images but mnist_cnn was built for 28x28.*image_size=32"):
        train(cfg)
    cfg = make_cfg("experiment=color_mnist/baseline", "data=folder", f"data.root={root}", "data.image_size=32",
                   "model.num_classes=2", "model.num_bias_groups=2", "model.student.num_classes=2", "debug=fdr",
                   "+model.student.image_size=32")
    assert 0.0 <= train(cfg)["test/acc"] <= 1.0


def test_init_path_loads_all_but_a_head_of_another_size(tmp_path: Path) -> None:
    import torchvision

    src = torchvision.models.resnet18(weights=None)  # 1000-class head, like ImageNet files
    torch.save(src.state_dict(), tmp_path / "r18.pth")
    model = create_student("torchvision:resnet18", num_classes=2, init_path=str(tmp_path / "r18.pth"))
    assert torch.equal(model.conv1.weight, src.conv1.weight) and torch.equal(model.layer4[1].bn2.bias, src.layer4[1].bn2.bias)
    assert model.fc.weight.shape == (2, 512)
    state = src.state_dict()
    state["conv1.weight"] = state["conv1.weight"][:, :1]  # a backbone mismatch is still an error
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CdistillError, match=r"conv1\.weight.*model\.student\.init_path"):
        create_student("torchvision:resnet18", num_classes=2, init_path=str(tmp_path / "bad.pth"))
