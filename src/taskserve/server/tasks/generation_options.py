"""The options of the generating text tasks: what text generation (``text_generation.py``)
and the encoder-decoder transforms (``seq2seq.py``) share, and text generation's own.
Apart from the tasks' modules so the generation code and its declaration change apart."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from taskserve.server.tasks.options import InModelDir, ModelFile
from taskserve.server.tasks.text import TextOptions


class GenerationOptions(TextOptions):
    """The keys every generating text task reads."""

    max_new_tokens: int = Field(
        256, ge=1, description="new tokens when a request does not say (lowered to the positions the prompt leaves)"
    )
    max_new_tokens_limit: int = Field(4096, ge=1, description="the most new tokens a request may ask for")
    max_concurrent_generations: int = Field(
        64, ge=1, description="generations at once on the model (each holds a KV cache); beyond: RESOURCE_EXHAUSTED"
    )
    eos_token_id: int | list[int] | None = Field(None, description="end-of-sequence id(s)")
    eos_token_ids: list[int] | None = Field(None, description="end-of-sequence ids (with generation_config's)")
    generation_config: ModelFile = Field(
        "generation_config.json", description="Hugging Face generation config (eos and decoder start ids)"
    )
    # Written by the exporter to describe the past key/values; the server reads the graph.
    num_layers: int | None = Field(None, description="decoder layers (written by the exporter, informative)")
    prompt_templates: dict[str, str] | None = Field(
        None,
        description="translation, summarization, text2text -> template with {text} (translation: {source}, "
        "{target}); switches on the transform services",
    )
    languages: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, min_length=1, description="source/target languages the model accepts (default: any name)"
    )


class TextGenerationOptions(GenerationOptions):
    chat_template: Annotated[str | None, InModelDir(unset="chat_template.jinja")] = Field(
        None, description="chat template file (default chat_template.jinja, else tokenizer_config.json's)"
    )
