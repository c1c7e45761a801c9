"""Export models to taskserve model repository entries.

``taskserve-export`` (``cli.py``) and the Python API (``api.py``) turn a Hugging Face
model, a sentence-transformers folder, any ``torch.nn.Module`` or an existing ONNX file
into ``DIR/<model>/config.yaml`` + ``DIR/<model>/<version>/model.onnx`` plus the files
the task needs. Each export runs the same steps (``pipeline.py``): export, validate
against the source model, optimize, optionally quantize / fp16 / TensorRT, write the
entry atomically. Nothing here is imported by the server.
"""
