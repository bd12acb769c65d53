"""The small CNN of the Concept Distillation MNIST experiments (registered as ``mnist_cnn``)."""

from __future__ import annotations

import torch
from torch import nn


class MnistCNN(nn.Module):
    """The small CNN of the Concept Distillation MNIST experiments.

    conv(in->20, k5) -> ReLU -> maxpool2 -> conv(20->50, k5) -> ReLU -> maxpool2 -> fc(800->500)
    -> ReLU -> fc(500->num_classes). Every stage is a named child so that layers can be addressed
    by path (``input``, ``conv2``, ``pool2``, ``fc1`` ...; ``input`` is an identity on the image).

    Args:
        in_chans: Input channels (3 for colour/texture MNIST, 1 for DecoyMNIST).
        num_classes: Output logits.
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.input = nn.Identity()  # the input as an addressable layer (pixel-level CAVs, no parameters)
        self.conv1 = nn.Conv2d(in_chans, 20, kernel_size=5)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(800, 500)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images ``[B, in_chans, 28, 28]`` to logits ``[B, num_classes]``."""
        x = self.pool1(self.relu1(self.conv1(self.input(x))))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc2(self.relu3(self.fc1(self.flatten(x))))
