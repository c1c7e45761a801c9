"""The HTTP door: one ASGI app (FastAPI on uvicorn) in the gRPC server's process and event
loop, serving the OpenAI-compatible API (``/v1``) and KServe v2 REST (``/v2``) over the
same models, tasks, batchers and engine as the gRPC door."""
