"""Image generation's plain v2 face through tritonclient.grpc: ``prompt`` (+ JSON
``parameters``) in, PNG ``image`` and ``seed`` out, the same pixels as the typed service."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tc
from PIL import Image
from tritonclient.utils import InferenceServerException

from taskserve.clients import TaskServeClient
from tests.diffusion.conftest import NAME
from tests.support.server import ServerThread

SIZE = 32
PROMPT = "the cat and the dog"


@pytest.fixture(scope="module")
def client(sd_server: ServerThread) -> Any:
    with tc.InferenceServerClient(sd_server.address) as c:
        yield c


def _inputs(prompt: str, parameters: dict[str, Any] | None = None) -> list[tc.InferInput]:
    inputs = [tc.InferInput("prompt", [1], "BYTES")]
    inputs[0].set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    if parameters is not None:
        inputs.append(tc.InferInput("parameters", [1], "BYTES"))
        inputs[-1].set_data_from_numpy(np.array([json.dumps(parameters).encode()], dtype=np.object_))
    return inputs


def test_metadata_says_prompt_in_image_out(client: Any) -> None:
    meta = client.get_model_metadata(NAME)
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("prompt", "BYTES", [1]),
        ("negative_prompt", "BYTES", [1]),
        ("parameters", "BYTES", [1]),
    ]
    assert [(t.name, t.datatype) for t in meta.outputs] == [("image", "BYTES"), ("seed", "INT64")]
    config = client.get_model_config(NAME).config
    assert [i.name for i in config.input] == ["prompt", "negative_prompt", "parameters"]
    assert not config.model_transaction_policy.decoupled


def test_prompt_gives_the_typed_services_png(client: Any, sd_server: ServerThread) -> None:
    params = {"size": f"{SIZE}x{SIZE}", "steps": 2, "seed": 7, "num_images": 2}
    result = client.infer(NAME, _inputs(PROMPT, params))
    images = result.as_numpy("image")
    assert images.shape == (2,)
    assert result.as_numpy("seed").tolist() == [7, 8]
    with TaskServeClient(sd_server.address) as typed:
        expected = typed.image_generation.text_to_image(
            PROMPT, model=NAME, width=SIZE, height=SIZE, steps=2, seed=7, num_images=2
        )
    for got, want in zip(images, expected, strict=True):
        assert Image.open(io.BytesIO(got)).size == (SIZE, SIZE)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(got))), np.asarray(Image.open(io.BytesIO(want.data))))


def test_request_parameters_work_too(client: Any) -> None:
    a = client.infer(NAME, _inputs(PROMPT, {"width": SIZE, "height": SIZE, "steps": 2, "seed": 3}))
    b = client.infer(NAME, _inputs(PROMPT), parameters={"width": SIZE, "height": SIZE, "steps": 2, "seed": 3})
    assert a.as_numpy("image").tolist() == b.as_numpy("image").tolist()


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"size": "big"}, "must look like 512x512"),
        ({"steps": 2, "strength": 0.5}, "unknown keys ['strength']"),
        ({"steps": 10_000}, "steps must be between 1 and"),
        ({"scheduler": "warp"}, "parameter 'scheduler' must be one of"),
    ],
)
def test_bad_parameters_are_invalid_argument(client: Any, params: dict[str, Any], message: str) -> None:
    with pytest.raises(InferenceServerException) as err:
        client.infer(NAME, _inputs(PROMPT, params))
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert message in err.value.message()
