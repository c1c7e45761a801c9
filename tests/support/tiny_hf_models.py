"""Tiny Hugging Face model directories with random weights, for tests.

Each builder writes a complete local model folder (config, safetensors weights and
tokenizer.json or preprocessor_config.json) that exports in seconds, offline.
"""

# transformers' factories are untyped.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

from pathlib import Path
from typing import Any

from taskserve.exporters.sources.text_samples import CONTEXTS, QUESTIONS, SENTENCES

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TEXT_LABELS = {
    "text-classification": ["negative", "neutral", "positive"],
    "token-classification": ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"],
}
_BERT_HEADS = {
    "feature-extraction": "BertModel",
    "text-classification": "BertForSequenceClassification",
    "token-classification": "BertForTokenClassification",
    "question-answering": "BertForQuestionAnswering",
    "fill-mask": "BertForMaskedLM",
}


def wordpiece_tokenizer(vocab_size: int = 300) -> Any:
    """A lower-casing BERT WordPiece tokenizer trained on the sample sentences."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    corpus = list(SENTENCES) + list(QUESTIONS) + list(CONTEXTS)
    tok.train_from_iterator(
        corpus, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS)
    )
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=64,
    )


def tiny_bert(directory: Path, task: str, seed: int = 0) -> Path:
    """A 2-layer, 32-wide BERT for an optimum text task, saved with its tokenizer."""
    import torch
    import transformers

    torch.manual_seed(seed)
    tokenizer = wordpiece_tokenizer()
    labels = TEXT_LABELS.get(task, ["LABEL_0", "LABEL_1"])
    config = transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    model = getattr(transformers, _BERT_HEADS[task])(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def tiny_detr_like(directory: Path, seed: int = 0) -> Path:
    """A tiny YOLOS object detector (ViT backbone, 3 classes) with its image processor, 64x64 inputs."""
    import torch
    from transformers import YolosConfig, YolosForObjectDetection, YolosImageProcessor

    torch.manual_seed(seed)
    labels = ["cat", "dog", "bird"]
    config = YolosConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=[64, 64],
        patch_size=16,
        num_detection_tokens=5,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    YolosForObjectDetection(config).eval().save_pretrained(directory)
    YolosImageProcessor(size={"height": 64, "width": 64}, do_pad=False).save_pretrained(directory)
    return directory


def tiny_segformer(directory: Path, seed: int = 0) -> Path:
    """A tiny SegFormer semantic segmenter (4 classes) with its image processor, 64x64 inputs."""
    import torch
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    torch.manual_seed(seed)
    labels = ["background", "person", "car", "road"]
    config = SegformerConfig(
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[16, 32],
        patch_sizes=[7, 3],
        strides=[4, 2],
        num_attention_heads=[1, 2],
        mlp_ratios=[2, 2],
        decoder_hidden_size=32,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    SegformerForSemanticSegmentation(config).eval().save_pretrained(directory)
    SegformerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(directory)
    return directory


def tiny_clip(directory: Path, seed: int = 0) -> Path:
    """A tiny CLIP (text + vision towers) with a WordPiece tokenizer and its image processor, 32x32."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    tokenizer = wordpiece_tokenizer()
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 64,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.cls_token_id,
            "eos_token_id": tokenizer.sep_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    CLIPModel(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        directory
    )
    return directory


# A ChatML template, the format SmolLM2-Instruct uses.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Text with multi-byte characters, so byte-level tokens split characters.
UNICODE_SAMPLES = [
    "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e, na\u00efve fa\u00e7ade.",
    "\u65e5\u672c\u8a9e\u306e\u6587\u7ae0\u3002",
    "Emoji \U0001f600\U0001f680 and \u00fcml\u00e4uts.",
]


def byte_level_tokenizer(vocab_size: int = 400) -> Any:
    """A GPT-2 style byte-level BPE tokenizer with ChatML special tokens and a chat template.

    Every byte is in the vocabulary, so any text encodes, and characters outside ASCII
    span several tokens (what incremental detokenization must handle)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = list(SENTENCES) + list(QUESTIONS) + list(CONTEXTS) + UNICODE_SAMPLES
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        model_max_length=128,
    )  # fmt: skip
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_causal_lm(directory: Path, architecture: str = "llama", seed: int = 0, hidden_size: int = 32) -> Path:
    """A 2-layer, 32-wide decoder (``llama`` with grouped-query attention, ``qwen2``, or ``gpt2``) with a
    byte-level tokenizer, a chat template and a generation config; 128 positions.
    ``hidden_size`` 64 gives the llama heads of 16, the smallest ONNX Runtime's
    GroupQueryAttention (the generation engine's graph) takes."""
    import torch
    import transformers

    torch.manual_seed(seed)
    tokenizer = byte_level_tokenizer()
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if architecture == "llama":
        config: Any = transformers.LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
            initializer_range=0.2,
            **special,
        )  # fmt: skip
        model: Any = transformers.LlamaForCausalLM(config)
    elif architecture == "qwen2":  # llama's shape with query/key/value biases, untied head
        config = transformers.Qwen2Config(
            vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
            initializer_range=0.2, use_sliding_window=False,
            **special,
        )  # fmt: skip
        model = transformers.Qwen2ForCausalLM(config)
    elif architecture == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128, initializer_range=0.2,
            **special,
        )
        model = transformers.GPT2LMHeadModel(config)
    else:
        raise ValueError(f"unknown architecture {architecture!r}; use llama, qwen2 or gpt2")
    model.eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    transformers.GenerationConfig(**special).save_pretrained(directory)
    return directory


def seq2seq_tokenizer(vocab_size: int = 400) -> Any:
    """A byte-level BPE tokenizer in the T5/BART manner: ``<pad>`` 0, ``</s>`` 1 (appended to
    every encoded text), ``<s>`` 2, ``<unk>`` 3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = list(SENTENCES) + list(QUESTIONS) + list(CONTEXTS) + UNICODE_SAMPLES
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>", "<s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<unk>",
        model_max_length=128,
    )  # fmt: skip


def tiny_seq2seq(directory: Path, architecture: str = "t5", seed: int = 0) -> Path:
    """A 2+2-layer, 32-wide encoder-decoder (``t5``, ``bart`` or ``marian``) with a byte-level tokenizer
    and a generation config; 128 positions. Random weights: plumbing and equality only."""
    import torch
    import transformers

    torch.manual_seed(seed)
    tokenizer = seq2seq_tokenizer()
    vocab = len(tokenizer)
    if architecture == "t5":
        config: Any = transformers.T5Config(
            vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, initializer_factor=4.0,
        )  # fmt: skip
        model: Any = transformers.T5ForConditionalGeneration(config)
    elif architecture == "bart":
        config = transformers.BartConfig(
            vocab_size=vocab, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
            pad_token_id=0, eos_token_id=1, bos_token_id=2, decoder_start_token_id=1, forced_eos_token_id=None,
            forced_bos_token_id=None, init_std=0.2,
        )  # fmt: skip
        model = transformers.BartForConditionalGeneration(config)
    elif architecture == "marian":
        config = transformers.MarianConfig(
            vocab_size=vocab, decoder_vocab_size=vocab, d_model=32, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
            max_position_embeddings=128, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
            forced_eos_token_id=None, init_std=1.0,
        )  # fmt: skip
        model = transformers.MarianMTModel(config)
    else:
        raise ValueError(f"unknown architecture {architecture!r}; use t5, bart or marian")
    model.eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    transformers.GenerationConfig(
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=config.decoder_start_token_id
    ).save_pretrained(directory)
    return directory
