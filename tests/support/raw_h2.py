"""One gRPC call over a hand-driven HTTP/2 connection (the h2 library), for requests the grpc
client refuses to send: header values that are not ASCII, odd bytes in metadata."""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events


@dataclass
class RawAnswer:
    """What the server sent back: headers and trailers merged, and whether the stream ended."""

    headers: dict[bytes, bytes] = field(default_factory=dict)
    ended: bool = False

    @property
    def status(self) -> int | None:
        value = self.headers.get(b"grpc-status")
        return None if value is None else int(value)

    @property
    def message(self) -> bytes:
        return self.headers.get(b"grpc-message", b"")


def raw_grpc_call(
    address: str,
    method: str | bytes,
    metadata: list[tuple[bytes, bytes]],
    message: bytes = b"",
    timeout: float = 10,
) -> RawAnswer:
    """Send ``message`` (serialized protobuf) to ``method`` with ``metadata`` as given, byte for byte."""
    host, port = address.rsplit(":", 1)
    config = h2.config.H2Configuration(client_side=True, header_encoding=None, validate_outbound_headers=False)
    conn = h2.connection.H2Connection(config=config)
    answer = RawAnswer()
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        conn.initiate_connection()
        stream = conn.get_next_available_stream_id()
        path = method if isinstance(method, bytes) else method.encode()
        headers = [
            (b":method", b"POST"), (b":scheme", b"http"), (b":path", path),
            (b":authority", address.encode()), (b"content-type", b"application/grpc"), (b"te", b"trailers"),
            *metadata,
        ]  # fmt: skip
        conn.send_headers(stream, headers)
        conn.send_data(stream, b"\x00" + struct.pack(">I", len(message)) + message, end_stream=True)
        sock.sendall(conn.data_to_send())
        deadline = time.monotonic() + timeout
        while not answer.ended and time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    answer.headers.update((bytes(k), bytes(v)) for k, v in event.headers)
                elif isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                    answer.ended = True
            sock.sendall(conn.data_to_send())
    return answer
