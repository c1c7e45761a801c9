"""What the KServe v2 doors (gRPC ``GRPCInferenceService`` and the HTTP v2 REST routes)
share beyond the wire format: the faces generating models present over plain tensors
(``faces.py``). No gRPC, no HTTP here: tensors are numpy arrays, as the doors' codecs
decode them, and request parameters a plain mapping."""
