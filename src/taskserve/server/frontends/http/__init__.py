"""The HTTP door: one ASGI app (FastAPI on uvicorn) in the gRPC server's process and event
loop, serving the OpenAI-compatible API (``/v1``) and KServe v2 REST (``/v2``) over the
same models, tasks, batchers and engine as the gRPC door."""


class HttpStartError(OSError):
    """The HTTP port cannot be bound, or its TLS files cannot be used; names which. Here, in the
    package's light module, so that main() can catch it without loading the ASGI stack."""
