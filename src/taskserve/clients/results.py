"""What the typed task calls return: small frozen dataclasses and numpy arrays."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class ServedBy:
    """The model name and the version that actually answered."""

    name: str
    version: str


@dataclass(frozen=True)
class LabelScore:
    label: str
    score: float
    # Class index in the model's output.
    index: int


@dataclass(frozen=True)
class Classification:
    """Labels for one input, best first."""

    labels: tuple[LabelScore, ...]

    @property
    def top(self) -> LabelScore:
        if not self.labels:
            raise ValueError("the classification holds no labels")
        return self.labels[0]


@dataclass(frozen=True)
class Entity:
    label: str
    score: float
    # Character offsets [start, end) into the text (Python str indices).
    start: int
    end: int
    text: str


@dataclass(frozen=True)
class AnswerSpan:
    text: str
    score: float
    # Character offsets [start, end) into the context; empty text and 0, 0 for "no answer".
    start: int
    end: int


@dataclass(frozen=True)
class MaskCompletion:
    token: str
    token_id: int
    score: float
    # The input text with this mask filled in.
    sequence: str


@dataclass(frozen=True)
class MaskPrediction:
    """Completions for one mask token, best first; ``start`` is its character offset."""

    start: int
    completions: tuple[MaskCompletion, ...]


@dataclass(frozen=True)
class BoundingBox:
    """Pixel coordinates in the original image, (0, 0) top-left."""

    x_min: float
    y_min: float
    x_max: float
    y_max: float


@dataclass(frozen=True)
class Detection:
    label: str
    score: float
    index: int
    box: BoundingBox


@dataclass(frozen=True)
class Detections:
    """Objects found in one image, best first, and the image's size."""

    detections: tuple[Detection, ...]
    width: int
    height: int


@dataclass(frozen=True)
class Segment:
    label: str
    index: int
    # Mean class probability over the segment's pixels.
    score: float
    area: int
    # 8-bit grayscale PNG of the original image's size: 255 inside the segment.
    mask_png: bytes

    def mask(self) -> npt.NDArray[np.bool_]:
        """The mask as a (height, width) boolean array (needs Pillow)."""
        from PIL import Image  # optional dependency, imported only when masks are decoded

        with Image.open(io.BytesIO(self.mask_png)) as img:
            return np.asarray(img.convert("L")) > 127


@dataclass(frozen=True)
class Segmentation:
    """Classes present in one image, largest area first."""

    segments: tuple[Segment, ...]
    width: int
    height: int


@dataclass(frozen=True)
class ImageTextScores:
    """Every image against every caption: arrays of shape (images, captions)."""

    similarities: npt.NDArray[np.float32]
    # Softmax over the captions; each row sums to 1.
    probabilities: npt.NDArray[np.float32]


FinishReason = Literal["length", "stop", "eos"]


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation for ``client.text.generate(messages=...)``."""

    role: str  # "system", "user", "assistant"
    content: str


@dataclass(frozen=True)
class GenerationUsage:
    prompt_tokens: int
    # Includes an end-of-sequence token or a stop string's tokens.
    generated_tokens: int


@dataclass(frozen=True)
class GenerationChunk:
    """One streamed piece of generated text and the token ids that produced it.

    Only the last chunk has ``finish_reason`` ("length", "stop" or "eos") and ``usage``."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    usage: GenerationUsage | None = None
    served_by: ServedBy | None = None


@dataclass(frozen=True)
class Generation:
    """A whole generation (``client.text.generate_text``)."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    usage: GenerationUsage
    served_by: ServedBy
