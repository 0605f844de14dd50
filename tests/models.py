"""Tiny PyTorch models for the backbone tests.

Each is a scaled-down member of a family edgec targets (MobileNetV2, ResNet,
VGG, an MLP head), small enough (1x3x32x32 inputs, <= 32 channels) that a
TVM build takes seconds. Weights are seeded; BatchNorm layers get real
running statistics from a few train-mode batches, so they are not identities.
"""

from __future__ import annotations

import torch
from torch import nn

IMAGE_SHAPE = (1, 3, 32, 32)
MLP_SHAPE = (1, 48)


def conv_bn(inputs: int, outputs: int, kernel: int, stride: int = 1, groups: int = 1, act: type | None = nn.ReLU6) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(inputs, outputs, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(outputs),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 project, plus x when shapes allow."""

    def __init__(self, inputs: int, outputs: int, stride: int, expansion: int):
        super().__init__()
        hidden = inputs * expansion
        self.block = nn.Sequential(
            conv_bn(inputs, hidden, 1),
            conv_bn(hidden, hidden, 3, stride, groups=hidden),
            conv_bn(hidden, outputs, 1, act=None),
        )
        self.residual = stride == 1 and inputs == outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        if self.residual:
            return x + y
        return y


class TinyMobileNetV2(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = conv_bn(3, 8, 3, 2)
        self.blocks = nn.Sequential(
            InvertedResidual(8, 8, 1, 2),  # residual Add
            InvertedResidual(8, 16, 2, 2),
            InvertedResidual(16, 16, 1, 2),  # residual Add
        )
        self.head = conv_bn(16, 32, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(self.pool(x), 1))


class BasicBlock(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int):
        super().__init__()
        self.conv1 = conv_bn(inputs, outputs, 3, stride, act=nn.ReLU)
        self.conv2 = conv_bn(outputs, outputs, 3, 1, act=None)
        self.downsample = conv_bn(inputs, outputs, 1, stride, act=None) if stride != 1 or inputs != outputs else nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.conv1(x)) + self.downsample(x))


class TinyResNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = conv_bn(3, 16, 3, 1, act=nn.ReLU)
        self.layer1 = BasicBlock(16, 16, 1)
        self.layer2 = BasicBlock(16, 32, 2)  # strided 1x1 downsample
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class TinyVGG(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(3, 8, 3, act=nn.ReLU),
            nn.MaxPool2d(2),
            conv_bn(8, 16, 3, act=nn.ReLU),
            nn.MaxPool2d(2),
            conv_bn(16, 32, 3, act=nn.ReLU),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(32 * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class MLP(nn.Module):
    def __init__(self, features: int = MLP_SHAPE[1], hidden: int = 32, classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class ProfileNet(nn.Module):
    """conv-BN-ReLU, depthwise + ReLU6 with a residual, pointwise, pooled Linear head: for the
    device tests, at inputs large enough that every kernel outlasts the VM's per-call overhead."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.conv3 = nn.Conv2d(32, 64, 1)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.clamp(self.conv2(y), 0, 6) + y
        return self.head(torch.relu(self.conv3(y)).mean(dim=(2, 3)))


MODELS: dict[str, tuple[type[nn.Module], tuple[int, ...]]] = {
    "mobilenet": (TinyMobileNetV2, IMAGE_SHAPE),
    "resnet": (TinyResNet, IMAGE_SHAPE),
    "vgg": (TinyVGG, IMAGE_SHAPE),
    "mlp": (MLP, MLP_SHAPE),
}


def build(name: str, seed: int = 0) -> nn.Module:
    """The model ``name`` with seeded weights and calibrated BatchNorm stats, in eval mode."""
    cls, shape = MODELS[name]
    torch.manual_seed(seed)
    model = cls()
    generator = torch.Generator().manual_seed(seed + 1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            # non-trivial affine parameters, so folding BN is not an identity
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.uniform_(-0.2, 0.2, generator=generator)
            module.momentum = None  # cumulative average over the calibration batches
    if any(isinstance(module, nn.BatchNorm2d) for module in model.modules()):
        model.train()
        with torch.no_grad():
            for _ in range(4):
                model(torch.randn((8, *shape[1:]), generator=generator))
    return model.eval()


def example_input(name: str, seed: int = 0) -> torch.Tensor:
    _, shape = MODELS[name]
    return torch.randn(shape, generator=torch.Generator().manual_seed(1000 + seed))
