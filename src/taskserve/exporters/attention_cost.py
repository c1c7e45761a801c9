"""How much attention memory a diffusion pipeline's exported parts need, measured on its own layers.

The parts are exported with plain attention: every self-attention layer holds a float32
(tokens x tokens) score matrix per head and row, with its softmax beside it. Hooks on each
``Attention`` layer record heads and tokens while each part runs its small export example
once; the worst layer, scaled to one squared latent pixel, gives the part's bytes per
row. A guided UNet runs two rows per image. The server turns the result
(``task_options.attention_bytes``) and a memory budget into its size limit
(server/tasks/diffusion/budget.py). Cross-attention (keys: the 77 prompt tokens) grows
linearly with the image and is left out.
"""

# mypy: disable-error-code="no-untyped-call"
from __future__ import annotations

from typing import Any

# A float32 score matrix and its softmax live at once.
_BYTES_PER_SCORE = 4 * 2
# Rows one image takes in a part's call: the UNet runs negative and positive prompt.
_ROWS_PER_IMAGE = {"unet": 2, "vae_decoder": 1, "vae_encoder": 1}


def _latent_tokens(key: str, example: dict[str, Any], vae_scale_factor: int) -> int:
    first = next(iter(example.values()))
    height, width = int(first.shape[2]), int(first.shape[3])
    if key == "vae_encoder":  # its input is pixels
        return (height // vae_scale_factor) * (width // vae_scale_factor)
    return height * width


def _recorder(scores: list[int]) -> Any:
    """A forward pre-hook appending each self-attention call's scores (heads x tokens**2 x rows)."""

    def record(layer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        context = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
        if context is not None:
            return  # cross-attention
        tokens = hidden.shape[2] * hidden.shape[3] if hidden.ndim == 4 else hidden.shape[1]
        scores.append(int(layer.heads) * int(tokens) ** 2 * int(hidden.shape[0]))

    return record


def attention_bytes(pipe: Any, modules: dict[str, tuple[Any, dict[str, Any], Any, Any]]) -> float:
    """Bytes of attention scores one image needs per squared latent pixel, in the worst part."""
    import torch
    from diffusers.models.attention_processor import Attention

    worst = 0.0
    for key, rows in _ROWS_PER_IMAGE.items():
        module, example, _, _ = modules[key]
        scores: list[int] = []
        record = _recorder(scores)
        layers = [m for m in module.modules() if isinstance(m, Attention)]
        handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in layers]
        try:
            with torch.no_grad():
                module(*example.values())
        finally:
            for handle in handles:
                handle.remove()
        batch = int(next(iter(example.values())).shape[0])
        tokens = _latent_tokens(key, example, int(pipe.vae_scale_factor))
        per_row = max(scores, default=0) * _BYTES_PER_SCORE / batch / tokens**2
        worst = max(worst, per_row * rows)
    return worst
