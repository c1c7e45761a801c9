"""The model configuration (``DIR/<model>/config.yaml``) as validated, frozen types.

Normalize, validate, freeze: ``load_model_config`` reads the YAML, pydantic checks
fields and ranges, ``ModelConfig`` cross-checks fields, and every error message names
the file, the field and how to fix it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from taskserve.server.errors import ConfigError
from taskserve.server.repository.paths import resolve_inside

Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BYTES",
]  # fmt: skip

# Tasks the server knows. "tensor" is a model served through the v2 protocol only.
Task = Literal[
    "tensor",
    "text-classification",
    "token-classification",
    "sentence-embedding",
    "question-answering",
    "fill-mask",
    "image-classification",
    "object-detection",
    "image-segmentation",
    "image-text-match",
    "text-generation",
    "text2text-generation",
    "image-generation",
]

Platform = Literal["onnxruntime", "tensorrt", "torch"]
ExecutionProvider = Literal["tensorrt", "cuda", "cpu"]
# Where the batcher pads an input's variable dims when requests of different sizes share a batch.
Padding = Literal["right", "left", "none"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TensorConfig(_Frozen):
    """One input or output. ``dims`` exclude the batch dimension when max_batch_size > 0."""

    name: str = Field(min_length=1)
    datatype: Datatype
    dims: tuple[int, ...]
    # Inputs: value used to pad variable-length dims when requests are batched.
    pad_value: float = 0
    # Inputs: where padding goes. "right" (the end; token ids of encoders), "left" (the
    # start, so the newest positions line up: attention masks and past key/values of
    # decoders), "none" (never padded: requests share a batch only with equal sizes).
    padding: Padding = "right"
    # Inputs: may be left out of a request.
    optional: bool = False
    # Outputs: name of the input whose padded axes this output shares; the batcher
    # slices those axes back to each request's own length (e.g. last_hidden_state
    # follows input_ids; a decoder's present key/values follow its past key/values).
    unpad_like: str | None = None

    @model_validator(mode="after")
    def _dims_valid(self) -> TensorConfig:
        if any(d == 0 or d < -1 for d in self.dims):
            raise ValueError(f"dims {list(self.dims)} of {self.name!r}: each must be a positive size or -1 (variable)")
        return self


class DynamicBatchingConfig(_Frozen):
    """How the batcher groups requests. ``max_batch_size: 1`` turns batching off."""

    # How long a forming batch may wait for more requests once the first arrived.
    max_queue_delay_us: int = Field(default=0, ge=0, le=10_000_000)
    preferred_batch_sizes: tuple[int, ...] = ()
    # Requests waiting beyond this are refused with RESOURCE_EXHAUSTED (0: unbounded).
    max_queue_size: int = Field(default=1024, ge=0)
    priority_levels: int = Field(default=1, ge=1, le=16)
    # 1 is the highest priority.
    default_priority: int = Field(default=1, ge=1)
    # Per-request timeout when the request sets none (0: no timeout beyond the gRPC deadline).
    default_timeout_us: int = Field(default=0, ge=0)
    # Optional sequence-length bucket edges: requests only share a batch within a bucket.
    length_buckets: tuple[int, ...] = ()
    # Batches expected to compute within this many microseconds (measured per row) run
    # on the event loop itself: for tiny models the hand-off to the instance thread
    # costs more than the model. 0 always uses the instance threads.
    inline_compute_us: int = Field(default=100, ge=0, le=10_000)

    @model_validator(mode="after")
    def _levels(self) -> DynamicBatchingConfig:
        if self.default_priority > self.priority_levels:
            raise ValueError(
                f"default_priority {self.default_priority} exceeds priority_levels {self.priority_levels}; "
                "lower default_priority or raise priority_levels"
            )
        if list(self.length_buckets) != sorted(set(self.length_buckets)) or any(b <= 0 for b in self.length_buckets):
            raise ValueError("length_buckets must be strictly increasing positive lengths, e.g. [16, 32, 64]")
        return self


class TensorRTOptions(_Frozen):
    fp16: bool = True
    int8: bool = False
    # Engine and timing caches live here so restarts skip the engine build; it must be
    # writable by the server (default: trt_cache/ next to the version directory).
    cache_dir: str | None = None
    max_workspace_mb: int = Field(default=2048, gt=0)
    # Build optimization profiles from max_batch_size and dynamic_batching.length_buckets
    # (onnxruntime's TensorRT provider; see runtimes/onnx_providers.py).
    profiles_from_buckets: bool = True


class TorchOptions(_Frozen):
    """``platform: torch`` (runtimes/torch_runtime.py)."""

    # auto: CUDA when the instance is placed on a GPU (``gpus``) or one is present, else CPU.
    device: Literal["auto", "cuda", "cpu"] = "auto"
    # auto: fp16 on CUDA, fp32 on CPU.
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    # torch.compile the module (first batches of each shape compile; warm-up pays for it).
    compile: bool = False
    # CUDA: capture one CUDA graph per (batch, length) bucket shape and replay it; batches
    # are padded up to the bucket shape. Ignored on CPU.
    cuda_graphs: bool = False


class RuntimeConfig(_Frozen):
    """Runtime options; providers are tried in order and skipped when unavailable."""

    execution_providers: tuple[ExecutionProvider, ...] = ("tensorrt", "cuda", "cpu")
    # 0: let the server size threads so instance_count instances share the cores.
    intra_op_threads: int = Field(default=0, ge=0)
    inter_op_threads: int = Field(default=1, ge=1)
    graph_optimization_level: Literal["disable", "basic", "extended", "all"] = "all"
    # Let idle intra-op threads spin-wait for work: lower latency per operator, but the
    # spinning steals cores from the event loop and other instances.
    allow_spinning: bool = False
    # onnxruntime's CPU memory arena keeps freed activation memory for the next run. A model
    # whose shapes vary widely (images of any size) should turn it off: the arena would keep
    # the largest run's peak for as long as the model is loaded.
    cpu_memory_arena: bool = True
    # CPU: a batch that starts while nothing else of this model computes or waits runs
    # on one extra session with alone_intra_op_threads threads (0: every usable core),
    # so a lone request gets all cores while loaded instances stay narrow.
    wide_when_alone: bool = False
    alone_intra_op_threads: int = Field(default=0, ge=0)
    device_id: int = Field(default=0, ge=0)
    tensorrt: TensorRTOptions = TensorRTOptions()
    # onnxruntime on CUDA: bind inputs/outputs (one host-to-device copy per input and one
    # device-to-host copy per output per batch, from reused buffers). See runtimes/io_binding.py.
    io_binding: bool = True
    # onnxruntime on CUDA: replay CUDA graphs for fixed bucket shapes (needs io_binding).
    cuda_graphs: bool = False
    torch: TorchOptions = TorchOptions()


class GenerationConfig(_Frozen):
    """The generation engine (``server/scheduling/generation_scheduler.py``): present for
    decoders exported with a resident KV cache (``past_key.N`` bound in place) and for
    encoder-decoders (``text2text-generation``, which always run on the engine: absent, these
    defaults). Every text-generation model runs on the engine: one without this block is refused."""

    # Sequences decoding at once; each holds one cache slot of max_model_len positions.
    max_num_seqs: int = Field(default=16, ge=1, le=1024)
    # Tokens one iteration computes: one per running sequence plus prefill chunks. Smaller
    # steps start prompts that arrive together sooner and stall decoding streams more often
    # (docs/generation.md, "Configuration").
    max_num_batched_tokens: int = Field(default=512, ge=1, le=1_000_000)
    # Positions one slot holds (prompt plus generated); at most what the graph's rotary table covers.
    max_model_len: int = Field(default=2048, ge=2, le=1_000_000)
    # Largest piece of one prompt computed in one iteration; 0: up to max_num_batched_tokens.
    prefill_chunk_size: int = Field(default=0, ge=0, le=1_000_000)
    # Keep computed prompt prefixes in idle cache slots and start matching prompts from them
    # (docs/generation.md, "Prefix cache"); evicted before any running sequence waits.
    prefix_caching: bool = True

    @model_validator(mode="after")
    def _budget(self) -> GenerationConfig:
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"generation.max_num_batched_tokens ({self.max_num_batched_tokens}) is below max_num_seqs "
                f"({self.max_num_seqs}): every running sequence needs a token per iteration; raise it"
            )
        if self.prefill_chunk_size > self.max_num_batched_tokens:
            raise ValueError(
                f"generation.prefill_chunk_size ({self.prefill_chunk_size}) exceeds max_num_batched_tokens "
                f"({self.max_num_batched_tokens}); lower it"
            )
        return self


class WarmupConfig(_Frozen):
    """Inputs the runtime executes before the model is marked READY."""

    enabled: bool = True
    batch_sizes: tuple[int, ...] = (1,)
    # Length used for variable dims of warm-up inputs.
    variable_dim_size: int = Field(default=8, ge=1)


class ModelLimits(_Frozen):
    """Request size limits of one model, checked before any heavy work (decoding,
    tokenizing, batching). Unset fields take the server's defaults (the --max-* flags
    of taskserve-server; ``TaskLimits`` in server/tasks/base.py holds their values)."""

    # Items (texts, images, pairs, chat messages) in one typed request.
    max_items: int | None = Field(default=None, ge=1)
    # Characters in one text.
    max_text_chars: int | None = Field(default=None, ge=1)
    # Pixels in one image (width x height, read from the header before decoding).
    max_image_pixels: int | None = Field(default=None, ge=1)
    # Pixels over all the images of one request.
    max_request_pixels: int | None = Field(default=None, ge=1)
    # Largest size of a variable (-1) dim of a v2 input.
    max_variable_dim: int | None = Field(default=None, ge=1)
    # Elements of one v2 BYTES input (refused before they are decoded one by one).
    max_bytes_elements: int | None = Field(default=None, ge=1)


class VersionPolicy(_Frozen):
    """Which numbered versions to serve: the newest ``latest``, ``all`` of them, or ``specific`` ones."""

    latest: int | None = Field(default=1, ge=1)
    all: bool = False
    specific: tuple[int, ...] = ()


class ModelConfig(_Frozen):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    task: Task = "tensor"
    platform: Platform = "onnxruntime"
    # 0: the model has no batch dimension; >=1 the largest batch the batcher forms.
    max_batch_size: int = Field(default=0, ge=0, le=65536)
    # None: taken from the ONNX graph at load time.
    inputs: tuple[TensorConfig, ...] | None = None
    outputs: tuple[TensorConfig, ...] | None = None
    dynamic_batching: DynamicBatchingConfig = DynamicBatchingConfig()
    instance_count: int = Field(default=1, ge=1, le=64)
    # Instance groups: instance_count instances on EACH of these GPU ids (empty: instance_count
    # instances on runtime.device_id, falling back to CPU where the runtime can).
    gpus: tuple[int, ...] = ()
    runtime: RuntimeConfig = RuntimeConfig()
    # Class labels file, one per line, relative to the model directory.
    labels: str | None = None
    warmup: WarmupConfig = WarmupConfig()
    version_policy: VersionPolicy = VersionPolicy()
    default_model_filename: str = "model.onnx"
    limits: ModelLimits = ModelLimits()
    # Task-specific settings (tokenizer, pooling, image preprocessing, ...), validated by the task.
    task_options: dict[str, Any] = Field(default_factory=dict)
    # The generation engine's settings; None: not an engine model.
    generation: GenerationConfig | None = None

    @model_validator(mode="after")
    def _cross_checks(self) -> ModelConfig:
        db = self.dynamic_batching
        for size in db.preferred_batch_sizes:
            if size < 1 or (self.max_batch_size and size > self.max_batch_size):
                raise ValueError(
                    f"dynamic_batching.preferred_batch_sizes entry {size} must be between 1 and "
                    f"max_batch_size ({self.max_batch_size}); remove it or raise max_batch_size"
                )
        for group in ("inputs", "outputs"):
            tensors = getattr(self, group) or ()
            names = [t.name for t in tensors]
            dupes = {n for n in names if names.count(n) > 1}
            if dupes:
                raise ValueError(f"{group} lists {sorted(dupes)} more than once; tensor names must be unique")
        if self.generation is not None and (
            self.instance_count != 1 or self.platform not in ("onnxruntime", "torch") or len(self.gpus or ()) > 1
        ):
            raise ValueError(
                "a model with a generation block runs one instance that holds the KV cache: set instance_count: 1, "
                "at most one GPU in gpus, and platform onnxruntime or torch (raise generation.max_num_seqs instead)"
            )
        if self.task == "text-generation" and self.generation is None:
            raise ValueError(
                f"task text-generation runs on the generation engine, and this entry has no generation: block: "
                "it is an old export whose graph takes the whole past_key_values on every step, which the server "
                "no longer serves; re-export the model from its Hugging Face directory with "
                f"`taskserve-export hf MODEL_DIR --task text-generation --out REPOSITORY --name {self.name}` "
                "(docs/generation.md)"
            )
        self._check_gpus()
        input_names = {t.name for t in self.inputs or ()}
        for out in self.outputs or ():
            if out.unpad_like is not None and self.inputs is not None and out.unpad_like not in input_names:
                raise ValueError(
                    f"output {out.name!r} has unpad_like {out.unpad_like!r}, which is not an input; "
                    f"use one of {sorted(input_names)}"
                )
        return self

    def _check_gpus(self) -> None:
        if not self.gpus:
            return
        if any(g < 0 for g in self.gpus) or len(set(self.gpus)) != len(self.gpus):
            raise ValueError(f"gpus {list(self.gpus)} must be distinct GPU ids >= 0, e.g. [0, 1]")
        if len(self.gpus) * self.instance_count > 64:
            raise ValueError("gpus x instance_count must be at most 64 instances")
        if self.platform == "onnxruntime" and not {"cuda", "tensorrt"} & set(self.runtime.execution_providers):
            raise ValueError(
                "gpus is set but runtime.execution_providers has no GPU provider; add 'cuda' or 'tensorrt'"
            )
        if self.platform == "torch" and self.runtime.torch.device == "cpu":
            raise ValueError("gpus is set but runtime.torch.device is 'cpu'; remove one of them")


def _quoted(value: Any, limit: int = 80) -> str:
    """A short repr of a refused value: enough to find it in the file, never the whole of it."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _format_validation_error(path: Path, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(
            f"  {loc}: {msg}" + (f" (got {_quoted(e['input'])})" if e["type"] != "value_error" and "input" in e else "")
        )
    return f"{path}: invalid model configuration:\n" + "\n".join(lines)


def parse_model_config(data: dict[str, Any], source: Path, default_name: str) -> ModelConfig:
    """Validate a config mapping; ``source`` is only used in error messages."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of settings at the top level, got {type(data).__name__}")
    data = dict(data)
    data.setdefault("name", default_name)
    if data["name"] != default_name:
        raise ConfigError(
            f"{source}: name {data['name']!r} does not match its directory {default_name!r}; "
            "rename the directory or remove the name field"
        )
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(source, err)) from None


# Nodes a config.yaml may hold with every alias (``*name``) expanded where it is used. Real
# configs hold hundreds (an id2label of 21k classes about 42k); a 700-byte alias bomb holds
# billions, and any message or walk over its values would expand them.
MAX_CONFIG_NODES = 200_000


class _ConfigLoader(yaml.SafeLoader):
    """safe_load's loader; aliases are counted before anything is built (``_check_expansion``)."""


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _check_expansion(root: yaml.Node, shown: Path) -> None:
    """Refuse a document that expands past MAX_CONFIG_NODES or refers to itself. Linear in
    the nodes as written: an aliased node is sized once and counted at each use."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            open_nodes.discard(key)
            sizes[key] = 1 + sum(sizes[id(child)] for child in _children(node))
            if sizes[key] > MAX_CONFIG_NODES:
                raise ConfigError(
                    f"{shown}: expands to more than {MAX_CONFIG_NODES} values (YAML aliases repeat what they "
                    "name); write the values out instead of aliasing them"
                )
            continue
        if key in sizes:
            continue
        if key in open_nodes:
            raise ConfigError(f"{shown}: a YAML alias refers to the node that contains it; remove the alias")
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in sizes)


def _parse_yaml(text: str, shown: Path) -> Any:
    loader = _ConfigLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, shown)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def load_model_config(model_dir: Path) -> ModelConfig:
    """Read and validate ``model_dir/config.yaml`` (a missing file means all defaults).

    The file is confined like every file a model's config names: a config.yaml that is a
    symlink out of the model directory is refused, never read."""
    link = model_dir / "config.yaml"
    shown = Path(model_dir.name, "config.yaml")  # messages reach callers: no server paths
    if not link.exists() and not link.is_symlink():
        return parse_model_config({}, shown, model_dir.name)
    path = resolve_inside(model_dir, "config.yaml", "config.yaml")
    if not path.is_file():  # a directory, a FIFO (whose read would never end), a dangling link
        raise ConfigError(f"{shown}: is not a regular file; make it one")
    try:
        data = _parse_yaml(path.read_text(encoding="utf-8"), shown) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{shown}: not valid YAML: {err}") from None
    except RecursionError:
        raise ConfigError(f"{shown}: nested too deeply to read") from None
    except (OSError, UnicodeDecodeError) as err:
        detail = err.strerror if isinstance(err, OSError) and err.strerror else type(err).__name__
        raise ConfigError(f"{shown}: cannot be read ({detail})") from None
    return parse_model_config(data, shown, model_dir.name)
