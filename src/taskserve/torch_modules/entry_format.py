"""The files of a torch entry's version directory: ``torch_model.json`` (the spec, naming an
architecture) and the weights as safetensors. The exporter writes them; the server's PyTorch
runtime reads them. No torch import: the exporter's config writer needs only the names."""

from __future__ import annotations

SPEC_FILE = "torch_model.json"
WEIGHTS_FILE = "model.safetensors"
# The newest spec format the runtime reads; a newer entry is refused with how to fix it.
SPEC_FORMAT = 1
ARCHITECTURES = ("sentence-transformer", "transformers", "causal-lm", "efficientnet-lite0")
AUTO_CLASSES = (
    "AutoModel",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
    "AutoModelForQuestionAnswering",
    "AutoModelForMaskedLM",
    "AutoModelForImageClassification",
    "AutoModelForCausalLM",
)
