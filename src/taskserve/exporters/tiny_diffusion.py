"""Small Stable Diffusion pipelines built from configs with random weights (no hub).

For tests, the demo repository and benchmarks: they prove shapes, determinism, batching
and equality with diffusers, never image quality. The CLIP BPE tokenizer is written
here too (a byte-level vocabulary plus a few merges), so nothing is downloaded.
"""

# mypy: disable-error-code="no-untyped-call"
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Merges of the tiny tokenizer: enough to see multi-byte tokens in tests.
_MERGES = [
    ("t", "h"), ("th", "e</w>"), ("a", "t</w>"), ("c", "at</w>"), ("o", "g</w>"), ("d", "og</w>"),
    ("r", "e"), ("e", "d</w>"), ("r", "ed</w>"), ("a", "n"), ("an", "d</w>"), ("o", "n</w>"),
]  # fmt: skip


@dataclass(frozen=True)
class TinySize:
    """Widths of the tiny models. ``TEST``: a 2x VAE (32x32 images have 16x16 latents), the
    smallest that exercises everything. ``BENCH``: Stable Diffusion's geometry (an 8x VAE: a
    64x64 image has 8x8 latents) with a UNet sized so 50 steps of one 64x64 image take about
    a second on 2 cores (11-13 ms per guided step measured here at load ~4)."""

    unet_channels: tuple[int, ...] = (32, 64)
    vae_channels: tuple[int, ...] = (32, 64)
    text_hidden: int = 32
    layers_per_block: int = 1


TEST = TinySize()
BENCH = TinySize(unet_channels=(64, 128), vae_channels=(32, 32, 64, 64), text_hidden=64, layers_per_block=2)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def write_clip_tokenizer(directory: Path) -> Path:
    """A CLIP BPE tokenizer (slow files and tokenizer.json) with model_max_length 77."""
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in _MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    work = directory / ".slow"
    work.mkdir(exist_ok=True)
    (work / "vocab.json").write_text(json.dumps(vocab))
    (work / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in _MERGES) + "\n")
    slow = CLIPTokenizer(
        str(work / "vocab.json"), str(work / "merges.txt"), model_max_length=77, pad_token="<|endoftext|>"
    )
    slow.save_pretrained(directory)
    CLIPTokenizerFast.from_pretrained(directory).save_pretrained(directory)
    for f in work.iterdir():
        f.unlink()
    work.rmdir()
    return directory


def scheduler_config() -> dict[str, Any]:
    """Stable Diffusion 1.x's scheduler settings (as saved with its PNDM scheduler)."""
    return {
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "set_alpha_to_one": False, "steps_offset": 1,
        "clip_sample": False, "skip_prk_steps": True, "timestep_spacing": "leading",
        "prediction_type": "epsilon", "trained_betas": None,
    }  # fmt: skip


def tiny_stable_diffusion(directory: Path, seed: int = 0, size: TinySize = TEST, inpaint: bool = False) -> Path:
    """Save a StableDiffusionPipeline (or, with ``inpaint``, a 9-channel
    StableDiffusionInpaintPipeline) folder built from configs with random weights."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tok_dir = write_clip_tokenizer(directory / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(seed)
    levels = len(size.unet_channels)
    unet = UNet2DConditionModel(
        block_out_channels=size.unet_channels,
        layers_per_block=size.layers_per_block,
        sample_size=32,
        in_channels=9 if inpaint else 4,
        out_channels=4,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        cross_attention_dim=size.text_hidden,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=size.vae_channels,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(size.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(size.vae_channels),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=size.text_hidden,
            intermediate_size=2 * size.text_hidden,
            layer_norm_eps=1e-5,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
        )  # fmt: skip
    )
    scheduler = DDIMScheduler.from_config(scheduler_config())
    cls = StableDiffusionInpaintPipeline if inpaint else StableDiffusionPipeline
    pipe = cls(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory
