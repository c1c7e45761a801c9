"""Code generated from protos/ by taskserve.clients.codegen."""
