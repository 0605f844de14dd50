"""The benchmark's models, full size, batch 1, 1x3x224x224, seeded weights.

- ``mobilenet_v2``: examples/mobilenet_v2.py ``build()`` (depthwise, ReLU6, residual adds).
- ``resnet18``: He et al. 2016, torchvision's layout (BasicBlock x [2, 2, 2, 2],
  7x7/2 stem, 3x3/2 max pool, 1x1/2 projection shortcuts).
- ``squeezenet1_1``: Iandola et al. 2016, v1.1 as in torchvision (Fire modules,
  concat of 1x1 and 3x3 expands, ceil-mode max pools, 1x1 conv classifier).

BatchNorm statistics are measured on seeded random batches in train mode (as
in examples/mobilenet_v2.py), so BN layers are not identities.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

INPUT_SHAPE = (1, 3, 224, 224)


class BasicBlock(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inputs != outputs:
            self.downsample = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + identity)


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        )
        layers = []
        channels = 64
        for outputs, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(channels, outputs, stride), BasicBlock(outputs, outputs, 1)]
            channels = outputs
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


class Fire(nn.Module):
    def __init__(self, inputs: int, squeeze: int, expand1x1: int, expand3x3: int):
        super().__init__()
        self.squeeze = nn.Sequential(nn.Conv2d(inputs, squeeze, 1), nn.ReLU(inplace=True))
        self.expand1x1 = nn.Sequential(nn.Conv2d(squeeze, expand1x1, 1), nn.ReLU(inplace=True))
        self.expand3x3 = nn.Sequential(nn.Conv2d(squeeze, expand3x3, 3, padding=1), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze(x)
        return torch.cat([self.expand1x1(x), self.expand3x3(x)], 1)


class SqueezeNet11(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 3, 2), nn.ReLU(inplace=True), pool,
            Fire(64, 16, 64, 64), Fire(128, 16, 64, 64), nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(128, 32, 128, 128), Fire(256, 32, 128, 128), nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(256, 48, 192, 192), Fire(384, 48, 192, 192), Fire(384, 64, 256, 256), Fire(512, 64, 256, 256),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Dropout(0.5), nn.Conv2d(512, num_classes, 1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)


def calibrate(model: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded He-normal weights; BN statistics measured on seeded random batches (eval mode after)."""
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.uniform_(module.bias, -0.1, 0.1)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.1, 0.1)
            module.momentum = None
    if any(isinstance(module, nn.BatchNorm2d) for module in model.modules()):
        model.train()
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for _ in range(2):
                model(torch.randn(8, *INPUT_SHAPE[1:], generator=generator))
    return model.eval()


def mobilenet_v2(seed: int = 0) -> nn.Module:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from mobilenet_v2 import build

    return build(seed=seed)


def resnet18(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)  # before construction: Linear's default init draws from the global RNG
    return calibrate(ResNet18(), seed)


def squeezenet1_1(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return calibrate(SqueezeNet11(), seed)


# torchvision's classification builders, for models this file does not define. PyPI's
# torchvision does not import beside torch 2.13.0+cpu (its C ops are built for the CUDA
# torch: "operator torchvision::nms does not exist", raised by the package's __init__); the
# model builders are pure Python. So the wheel (and Pillow, which torchvision.utils imports)
# is unpacked into ~/.cache/edgec/torchvision and `torchvision` is made a bare namespace
# whose __init__ never runs: `torchvision.models` imports, the C ops are never touched.
TORCHVISION = ("torchvision==0.28.0", "pillow==13.0.0")


def torchvision_models():
    """The ``torchvision.models`` module, installed on first use (network: PyPI) and cached."""
    import importlib
    import subprocess
    import types

    if "torchvision.models" in sys.modules:
        return sys.modules["torchvision.models"]
    site = Path.home() / ".cache" / "edgec" / "torchvision" / "-".join(spec.replace("==", "") for spec in TORCHVISION)
    if not (site / "torchvision" / "models").is_dir():
        partial = site.with_name(site.name + ".partial")
        command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(partial), *TORCHVISION]
        subprocess.run(command, check=True)
        partial.rename(site)
    sys.path.append(str(site))  # Pillow
    package = types.ModuleType("torchvision")
    package.__path__ = [str(site / "torchvision")]
    package.__version__ = TORCHVISION[0].split("==")[1]
    sys.modules["torchvision"] = package
    return importlib.import_module("torchvision.models")


def torchvision_model(name: str, seed: int = 0) -> nn.Module:
    """torchvision's ``name`` with seeded random weights and measured BN statistics."""
    torch.manual_seed(seed)
    return calibrate(torchvision_models().get_model(name, weights=None), seed)


MODELS = {"mobilenet_v2": mobilenet_v2, "resnet18": resnet18, "squeezenet1_1": squeezenet1_1}
# the issue-14 set: the three above plus torchvision's small mobile CNNs
TORCHVISION_MODELS = ("shufflenet_v2_x0_5", "mobilenet_v3_small", "mnasnet0_5", "efficientnet_b0")


def build(name: str, seed: int = 0) -> nn.Module:
    """A benchmark model by name: one of MODELS, else a torchvision classification model."""
    if name in MODELS:
        return MODELS[name](seed)
    return torchvision_model(name, seed)


def save_torchscript(name: str, path: Path, seed: int = 0) -> Path:
    """Build model ``name`` and save it as TorchScript at ``path`` (what `edgec compile` takes)."""
    model = build(name, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(model), str(path))
    return path
