# mypy: ignore-errors
# (runs in its own virtualenv with packages this one lacks; not type-checked here)
"""A custom MLServer runtime that serves an ONNX model with onnxruntime (MLServer ships none).

Copied next to model-settings.json by ``taskserve-bench peers`` and loaded by
``.venv-mlserver/bin/mlserver start``. Session settings (threads, no spin-waiting)
come from ``parameters.extra`` and match taskserve's. MLServer's adaptive batching
(``max_batch_size``/``max_batch_time`` in model-settings.json) merges requests
before ``predict`` sees them.
"""

from __future__ import annotations

import asyncio
from typing import Any

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxRuntimeModel(MLModel):
    async def load(self) -> bool:
        extra: dict[str, Any] = dict(self.settings.parameters.extra or {}) if self.settings.parameters else {}
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(extra.get("intra_op_threads", 1))
        opts.inter_op_num_threads = int(extra.get("inter_op_threads", 1))
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        path = await get_model_uri(self.settings)
        self._session = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
        self._output_names = [o.name for o in self._session.get_outputs()]
        return True

    def _run(self, feed: dict[str, Any]) -> list[Any]:
        return list(self._session.run(self._output_names, feed))

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feed = {inp.name: NumpyCodec.decode_input(inp) for inp in payload.inputs}
        # A worker thread keeps the event loop free to receive the next requests.
        results = await asyncio.get_running_loop().run_in_executor(None, self._run, feed)
        outputs = [NumpyCodec.encode_output(name, arr) for name, arr in zip(self._output_names, results, strict=True)]
        return InferenceResponse(model_name=self.name, model_version=self.version, id=payload.id, outputs=outputs)
