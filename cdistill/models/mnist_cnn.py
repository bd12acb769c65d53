"""The small CNN of the Concept Distillation MNIST experiments (registered as ``mnist_cnn``)."""

from __future__ import annotations

import torch
from torch import nn

from cdistill.errors import CdistillError

#: The smallest input side that leaves a 1x1 map after the two conv-pool stages.
MIN_IMAGE_SIZE = 16


def flat_features(image_size: int) -> int:
    """Length of the flattened ``pool2`` output for square inputs of side ``image_size``
    (800 at 28: 50 channels x 4 x 4).

    Raises:
        CdistillError: A side under :data:`MIN_IMAGE_SIZE`.
    """
    if image_size < MIN_IMAGE_SIZE:
        raise CdistillError(
            f"model.student.image_size={image_size}: the MNIST CNN needs inputs of at least "
            f"{MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE} (two 5x5 convolutions, each followed by a 2x2 pool)."
        )
    side = ((image_size - 4) // 2 - 4) // 2
    return 50 * side * side


def check_image_size(x: torch.Tensor, image_size: int) -> None:
    """Raise a :class:`CdistillError` unless ``x [B, C, H, W]`` is ``image_size`` square."""
    if tuple(x.shape[-2:]) != (image_size, image_size):
        raise CdistillError(
            f"The MNIST CNN was built for {image_size}x{image_size} inputs but got "
            f"{x.shape[-2]}x{x.shape[-1]}: set model.student.image_size={x.shape[-1]} (square "
            "images) or resize the data to match."
        )


# A torch.fx trace records the check as one call instead of branching on symbolic sizes, so
# the network stays traceable (the causal basis replays only the part after a layer).
torch.fx.wrap("check_image_size")


class MnistCNN(nn.Module):
    """The small CNN of the Concept Distillation MNIST experiments.

    conv(in->20, k5) -> ReLU -> maxpool2 -> conv(20->50, k5) -> ReLU -> maxpool2 -> fc(F->500)
    -> ReLU -> fc(500->num_classes), with ``F = 800`` at 28x28 (the paper's). Every stage is a
    named child so that layers can be addressed by path (``input``, ``conv2``, ``pool2``,
    ``fc1`` ...; ``input`` is an identity on the image). At 28x28 the layers, their creation
    order and so their initialisation are those of the paper's network.

    Args:
        in_chans: Input channels (3 for colour/texture MNIST, 1 for DecoyMNIST).
        num_classes: Output logits.
        image_size: Side of the square inputs (>= 16); ``fc1`` is sized for it and other sizes
            are refused with an error naming this one.
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 10, image_size: int = 28) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.image_size = int(image_size)
        features = flat_features(self.image_size)
        self.input = nn.Identity()  # the input as an addressable layer (pixel-level CAVs, no parameters)
        self.conv1 = nn.Conv2d(in_chans, 20, kernel_size=5)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(features, 500)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images ``[B, in_chans, S, S]`` (``S = image_size``) to logits ``[B, num_classes]``."""
        check_image_size(x, self.image_size)
        x = self.pool1(self.relu1(self.conv1(self.input(x))))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc2(self.relu3(self.fc1(self.flatten(x))))
