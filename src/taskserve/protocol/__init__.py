"""What the client and the server share: the code generated from protos/, the v2
datatype table and the BYTES tensor wire encoding. It depends on grpcio, protobuf
and numpy only; ``taskserve.clients`` and ``taskserve.server`` both import it and
never each other."""
