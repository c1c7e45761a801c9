"""Client settings, the service config they produce, and the v2 tensor codec (no server)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from taskserve.clients import ClientOptions, RetryPolicy, TlsConfig
from taskserve.clients.errors import DeadlineExceeded, TaskServeError, error_for
from taskserve.clients.v2_codec import decode_infer_response, encode_infer_request, parameter_value
from taskserve.protocol.generated.inference import grpc_service_pb2 as pb


def test_service_config_has_retry_and_load_balancing() -> None:
    opts = ClientOptions(
        retry=RetryPolicy(max_attempts=4, initial_backoff_s=0.05, max_backoff_s=2.0, backoff_multiplier=3.0),
        wait_for_ready=True,
    )
    config = json.loads(opts.service_config())
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    [method] = config["methodConfig"]
    assert method["name"] == [{}]
    assert method["waitForReady"] is True
    assert method["retryPolicy"] == {
        "maxAttempts": 4, "initialBackoff": "0.05s", "maxBackoff": "2.0s",
        "backoffMultiplier": 3.0, "retryableStatusCodes": ["UNAVAILABLE"],
    }  # fmt: skip
    channel_opts = dict(opts.channel_options())
    assert channel_opts["grpc.enable_retries"] == 1
    assert channel_opts["grpc.max_receive_message_length"] == 64 * 1024 * 1024
    assert channel_opts["grpc.keepalive_time_ms"] == 60_000


def test_no_retry_and_pick_first() -> None:
    opts = ClientOptions(
        retry=None, load_balancing="pick_first", extra_channel_options=(("grpc.primary_user_agent", "x"),)
    )
    config = json.loads(opts.service_config())
    assert "retryPolicy" not in config["methodConfig"][0]
    assert config["loadBalancingConfig"] == [{"pick_first": {}}]
    channel_opts = opts.channel_options()
    assert ("grpc.enable_retries", 0) in channel_opts
    assert channel_opts[-1] == ("grpc.primary_user_agent", "x")


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: RetryPolicy(max_attempts=9), "2 to 5"),
        (lambda: RetryPolicy(initial_backoff_s=0), "positive"),
        (lambda: ClientOptions(timeout_s=0), "timeout_s"),
        (lambda: ClientOptions(compression="brotli"), "compression"),  # type: ignore[arg-type]
        (lambda: TlsConfig(private_key=b"k"), "both private_key and certificate_chain"),
    ],
)
def test_invalid_settings_say_what_to_fix(make: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()  # type: ignore[operator]


def test_tls_override_becomes_a_channel_option() -> None:
    opts = ClientOptions(tls=TlsConfig(root_certificates=b"pem", server_name_override="svc.internal"))
    assert ("grpc.ssl_target_name_override", "svc.internal") in opts.channel_options()


def test_error_for_unknown_codes_is_the_base_class() -> None:
    import grpc

    err = error_for(grpc.StatusCode.DATA_LOSS, "bits fell out")
    assert type(err) is TaskServeError and err.code == grpc.StatusCode.DATA_LOSS
    assert str(err) == "DATA_LOSS: bits fell out"
    assert isinstance(error_for(grpc.StatusCode.DEADLINE_EXCEEDED, "late"), DeadlineExceeded)


def test_big_endian_arrays_are_sent_little_endian() -> None:
    x = np.array([1.5, -2.0], dtype=">f4")
    request = encode_infer_request("m", {"x": x})
    assert request.inputs[0].datatype == "FP32"
    assert request.raw_input_contents[0] == np.array([1.5, -2.0], dtype="<f4").tobytes()


def test_parameters_round_trip_and_validation() -> None:
    request = encode_infer_request("m", {}, parameters={"big": 2**64 - 1, "neg": -3})
    assert parameter_value(request.parameters["big"]) == 2**64 - 1
    assert parameter_value(request.parameters["neg"]) == -3
    with pytest.raises(ValueError, match="priority"):
        encode_infer_request("m", {}, priority=-1)
    with pytest.raises(ValueError, match="no value"):
        parameter_value(pb.InferParameter())


def test_decode_rejects_mismatched_raw_contents() -> None:
    response = pb.ModelInferResponse()
    response.outputs.add(name="a", datatype="FP32", shape=[1])
    response.outputs.add(name="b", datatype="FP32", shape=[1])
    response.raw_output_contents.append(np.zeros(1, np.float32).tobytes())
    with pytest.raises(ValueError, match="2 outputs but 1 raw"):
        decode_infer_response(response)


def test_decode_fp16_typed_contents_is_refused() -> None:
    response = pb.ModelInferResponse()
    response.outputs.add(name="h", datatype="FP16", shape=[1])
    with pytest.raises(ValueError, match="raw contents"):
        decode_infer_response(response)


def test_raw_outputs_are_zero_copy_views() -> None:
    response = pb.ModelInferResponse()
    response.outputs.add(name="y", datatype="INT32", shape=[2, 2])
    response.raw_output_contents.append(np.arange(4, dtype="<i4").tobytes())
    y = decode_infer_response(response)["y"]
    np.testing.assert_array_equal(y, [[0, 1], [2, 3]])
    assert not y.flags.writeable


def test_round_robin_watches_server_health_unless_turned_off() -> None:
    assert json.loads(ClientOptions().service_config())["healthCheckConfig"] == {"serviceName": ""}
    assert "healthCheckConfig" not in json.loads(ClientOptions(health_check=False).service_config())


def test_static_target_lists_servers_for_round_robin() -> None:
    from taskserve.clients.channel import static_target

    assert static_target(["10.0.0.1:8001", "10.0.0.2:8001"]) == "ipv4:10.0.0.1:8001,10.0.0.2:8001"
    assert static_target(["[::1]:8001"]) == "ipv6:[::1]:8001"
    for bad in ([], ["localhost:8001"], ["10.0.0.1"], ["10.0.0.1:1", "[::1]:2"]):
        with pytest.raises(ValueError):
            static_target(bad)
