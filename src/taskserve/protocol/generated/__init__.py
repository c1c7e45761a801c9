"""Code generated from protos/ by taskserve.protocol.codegen."""
