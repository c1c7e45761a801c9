"""Triton's ModelConfig message for a loaded model, as both doors answer it (gRPC ModelConfig,
REST ``/v2/models/{m}/config``): its own tensors or its face's, where its instances run, its
batching and version policy."""

from __future__ import annotations

from taskserve.protocol.generated.inference import model_config_pb2 as mc
from taskserve.server.frontends.v2.faces import Faces, is_decoupled
from taskserve.server.frontends.v2.service import PLATFORM
from taskserve.server.serving.loaded_model import LoadedModel

# Triton's backend names for the same platforms.
BACKEND = {"onnxruntime": "onnxruntime", "tensorrt": "tensorrt", "torch": "pytorch"}


def model_config_message(model: LoadedModel, faces: Faces | None = None) -> mc.ModelConfig:
    """Triton's ModelConfig for ``model``: its own tensors, or its face's (``faces``)."""
    config = faces.config(model) if faces is not None else model.config
    message = mc.ModelConfig(
        name=model.name,
        platform=PLATFORM[config.platform],
        backend=BACKEND[config.platform],
        max_batch_size=config.max_batch_size,
        default_model_filename=config.default_model_filename,
    )
    for spec in config.inputs or ():
        message.input.add(
            name=spec.name,
            data_type=mc.DataType.Value(_config_type(spec.datatype)),
            dims=spec.dims,
            optional=spec.optional,
        )
    for spec in config.outputs or ():
        message.output.add(name=spec.name, data_type=mc.DataType.Value(_config_type(spec.datatype)), dims=spec.dims)
        if config.labels:
            message.output[-1].label_filename = config.labels
    message.instance_group.add(
        name=model.name, count=config.instance_count, kind=_instance_kind(model), gpus=list(config.gpus)
    )
    db = config.dynamic_batching
    if config.max_batch_size > 1:
        message.dynamic_batching.preferred_batch_size.extend(db.preferred_batch_sizes)
        message.dynamic_batching.max_queue_delay_microseconds = db.max_queue_delay_us
        message.dynamic_batching.priority_levels = db.priority_levels
        message.dynamic_batching.default_priority_level = db.default_priority
        message.dynamic_batching.default_queue_policy.max_queue_size = db.max_queue_size
        message.dynamic_batching.default_queue_policy.default_timeout_microseconds = db.default_timeout_us
        message.dynamic_batching.default_queue_policy.allow_timeout_override = True
    policy = config.version_policy
    if policy.all:
        message.version_policy.all.SetInParent()
    elif policy.specific:
        message.version_policy.specific.versions.extend(policy.specific)
    else:
        message.version_policy.latest.num_versions = policy.latest or 1
    message.parameters["task"].string_value = config.task
    if faces is not None and is_decoupled(model):
        message.model_transaction_policy.decoupled = True
    return message


def _instance_kind(model: LoadedModel) -> mc.ModelInstanceGroup.Kind.ValueType:
    """Where the loaded instances run, as Triton reports a resolved kind (``count`` is per GPU
    when ``gpus`` is set, as in Triton). Engine entries have no batcher runtimes: their
    placement is the config's ``gpus``."""
    if model.config.gpus or any(runtime.on_gpu for runtime in model.runtimes):
        return mc.ModelInstanceGroup.KIND_GPU
    return mc.ModelInstanceGroup.KIND_CPU


def _config_type(datatype: str) -> str:
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"
