"""The committed generated code must match protos/ exactly."""

from __future__ import annotations

import subprocess
import sys


def test_generated_code_matches_protos() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "taskserve.protocol.codegen", "--check"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "matches" in result.stdout


def test_generated_code_coexists_with_tritonclient() -> None:
    # tritonclient registers another `inference` package in protobuf's default pool.
    code = (
        "import tritonclient.grpc\n"
        "from taskserve.protocol.generated.inference import grpc_service_pb2 as pb\n"
        "r = pb.ModelInferRequest(model_name='m')\n"
        "assert pb.ModelInferRequest.FromString(r.SerializeToString()).model_name == 'm'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
