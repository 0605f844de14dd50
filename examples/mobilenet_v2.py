"""Write the bundled example: a MobileNetV2 (Sandler et al. 2018) as TorchScript.

Weights are random but fixed (seeded); BatchNorm running statistics are real:
measured by forward passes in training mode over seeded random images, so
the BN layers are not identities and the model behaves like a trained one
numerically (activations stay in range through all 17 blocks).

    python examples/mobilenet_v2.py -o build/examples/mobilenet_v2.pt [--width 1.0 --resolution 224]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn


def conv_bn(inputs: int, outputs: int, kernel: int, stride: int, groups: int = 1, relu: bool = True) -> nn.Sequential:
    layers = [
        nn.Conv2d(inputs, outputs, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(outputs),
    ]
    if relu:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int, expansion: int):
        super().__init__()
        hidden = inputs * expansion
        layers = [] if expansion == 1 else [conv_bn(inputs, hidden, 1, 1)]
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden), conv_bn(hidden, outputs, 1, 1, relu=False)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and inputs == outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


def _round(channels: float, divisor: int = 8) -> int:
    return max(divisor, int(channels + divisor / 2) // divisor * divisor)


class MobileNetV2(nn.Module):
    # (expansion, channels, repeats, first stride), as in the paper's Table 2
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes: int = 1000, width: float = 1.0):
        super().__init__()
        channels = _round(32 * width)
        last = _round(1280 * max(1.0, width))
        layers: list[nn.Module] = [conv_bn(3, channels, 3, 2)]
        for expansion, base, repeats, stride in self.SETTINGS:
            outputs = _round(base * width)
            for index in range(repeats):
                layers.append(InvertedResidual(channels, outputs, stride if index == 0 else 1, expansion))
                channels = outputs
        layers.append(conv_bn(channels, last, 1, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def build(width: float = 1.0, resolution: int = 224, num_classes: int = 1000, seed: int = 0) -> MobileNetV2:
    """A MobileNetV2 with seeded weights and BN statistics measured on seeded random batches."""
    torch.manual_seed(seed)
    model = MobileNetV2(num_classes, width)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.1, 0.1)
            module.momentum = None  # cumulative average over the calibration batches
    model.train()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(8, 3, resolution, resolution, generator=generator))
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", type=Path, default=Path("build/examples/mobilenet_v2.pt"))
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--resolution", type=int, default=224)
    args = parser.parse_args()
    model = build(args.width, args.resolution)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(model), str(args.output))
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.output} (MobileNetV2 width {args.width}, {params / 1e6:.2f} M parameters, "
          f"input 1x3x{args.resolution}x{args.resolution})")


if __name__ == "__main__":
    main()
