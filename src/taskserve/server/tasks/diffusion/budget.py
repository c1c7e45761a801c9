"""What one generation may cost in memory, and the largest image that fits.

The exported UNet and VAE compute attention the plain way: every self-attention layer
holds a (tokens x tokens) score matrix per head and row, and its softmax beside it, where
tokens are the latent pixels at that layer's resolution. So a request's peak memory grows
with the square of its latent area: ``images * attention_bytes * (latent pixels)**2``.
``attention_bytes`` is measured by the exporter on the pipeline's own layers (the worst
part, per image: a guided UNet runs two rows per image; see exporters/diffusion.py), and
the size limit follows from the budget one request may take:

    latent pixels <= sqrt(budget / (images * attention_bytes))
    pixels        <= latent pixels * vae_scale_factor**2

The rest of a request (convolution activations, latents, images) is linear in its area
and small beside the scores at any size the budget allows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Memory one request's attention may take (task_options.attention_memory_budget).
DEFAULT_BUDGET = 1 << 30


@dataclass(frozen=True)
class AttentionBudget:
    # Bytes of attention scores one image needs per squared latent pixel (0: unknown).
    attention_bytes: float
    # Bytes one request may take.
    budget: int
    vae_scale_factor: int

    def cost(self, width: int, height: int, images: int) -> int:
        """Peak attention bytes of a request for ``images`` images of width x height pixels."""
        tokens = (width // self.vae_scale_factor) * (height // self.vae_scale_factor)
        return math.ceil(images * self.attention_bytes * tokens * tokens)

    def max_pixels(self, images: int = 1) -> int | None:
        """Pixels per image the budget affords for ``images`` images; None when unknown."""
        if self.attention_bytes <= 0:
            return None
        tokens = math.isqrt(int(self.budget / (images * self.attention_bytes)))
        return tokens * self.vae_scale_factor**2


def gib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB"
