# mypy: ignore-errors
# (runs in its own virtualenv with packages this one lacks; not type-checked here)
"""Serve one ONNX model with KServe's ModelServer (v2 gRPC), bound to 127.0.0.1.

Run with the KServe environment made by setup.sh:
    .venv-kserve/bin/python benchmarks/peers/kserve_server.py --model-file M.onnx --model-name NAME --grpc-port P

A ``kserve.Model`` subclass running onnxruntime with the same session settings as
taskserve (threads, no spin-waiting); ``predict`` runs the session on a worker
thread so the event loop keeps accepting requests. KServe has no dynamic batching
in the model server: each request runs on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--model-file", required=True)
    p.add_argument("--model-name", required=True)
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--intra-op-threads", type=int, default=1)
    p.add_argument("--inter-op-threads", type=int, default=1)
    p.add_argument("--max-threads", type=int, default=4, help="KServe's gRPC worker threads")
    p.add_argument("--sessions", type=int, default=1, help="onnxruntime sessions (replicas), one worker thread each")
    return p.parse_args()


def bind_to_localhost() -> None:
    """KServe hard-codes all-interface binds ("[::]" for gRPC, "0.0.0.0" for REST); keep both on 127.0.0.1."""
    import grpc.aio
    import uvicorn
    from kserve.protocol.grpc import server as grpc_server_module
    from kserve.protocol.rest import server as rest_server_module

    original_server = grpc.aio.server

    def local_server(*args: Any, **kwargs: Any) -> Any:
        server = original_server(*args, **kwargs)
        add_port = server.add_insecure_port

        def add_local_port(address: str) -> int:
            return add_port(address.replace("[::]", "127.0.0.1").replace("0.0.0.0", "127.0.0.1"))

        server.add_insecure_port = add_local_port
        return server

    grpc_server_module.aio.server = local_server
    original_config = uvicorn.Config

    def local_config(app: Any, **kwargs: Any) -> Any:
        kwargs["host"] = "127.0.0.1"
        return original_config(app, **kwargs)

    rest_server_module.uvicorn.Config = local_config


def main() -> None:
    args = parse_args()
    # kserve parses sys.argv when imported: hand it only the program name.
    sys.argv = sys.argv[:1]
    import kserve
    import numpy as np
    import onnxruntime as ort
    from kserve import InferOutput, InferRequest, InferResponse
    from kserve.utils.numpy_codec import from_np_dtype

    bind_to_localhost()

    class OnnxModel(kserve.Model):
        def __init__(self, name: str, path: str) -> None:
            super().__init__(name)
            self.path = path
            self.session: Any = None
            self.idle: Any = None
            self.pool: Any = None

        def load(self) -> bool:
            import queue
            from concurrent.futures import ThreadPoolExecutor

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = args.intra_op_threads
            opts.inter_op_num_threads = args.inter_op_threads
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            # Replicas: each request takes a free session, so N run side by side.
            self.idle = queue.SimpleQueue()
            for _ in range(args.sessions):
                self.idle.put(
                    ort.InferenceSession(self.path, sess_options=opts, providers=["CPUExecutionProvider"])
                )
            self.session = self.idle.get()
            self.idle.put(self.session)
            # One session: asyncio's default executor, concurrent runs on it (the default setup).
            self.pool = ThreadPoolExecutor(max_workers=args.sessions) if args.sessions > 1 else None
            self.ready = True
            return True

        def _run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
            if self.pool is None:
                return list(self.session.run(None, feed))
            session = self.idle.get()
            try:
                return list(session.run(None, feed))
            finally:
                self.idle.put(session)

        async def predict(
            self, payload: InferRequest, headers: Any = None, response_headers: Any = None
        ) -> InferResponse:
            feed = {inp.name: inp.as_numpy() for inp in payload.inputs}
            results = await asyncio.get_running_loop().run_in_executor(self.pool, self._run, feed)
            outputs = []
            for meta, array in zip(self.session.get_outputs(), results, strict=True):
                out = InferOutput(name=meta.name, shape=list(array.shape), datatype=from_np_dtype(array.dtype))
                out.set_data_from_numpy(array, binary_data=True)
                outputs.append(out)
            return InferResponse(
                response_id=payload.id, model_name=self.name, infer_outputs=outputs, use_binary_outputs=True
            )

    model = OnnxModel(args.model_name, args.model_file)
    model.load()
    server = kserve.ModelServer(
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        max_threads=args.max_threads,
        enable_latency_logging=False,
    )
    server.start([model])


if __name__ == "__main__":
    main()
