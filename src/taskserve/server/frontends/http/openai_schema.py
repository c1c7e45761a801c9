"""The OpenAI request bodies this server reads, as validated types, and their translation
to the tasks' parameters. Fields OpenAI defines but this server cannot honour are declared
so that a caller who sets them is told, instead of being silently ignored."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from taskserve.server.errors import InvalidInput
from taskserve.server.frontends.http.errors import HttpError
from taskserve.server.tasks.chat_template import ChatMessage
from taskserve.server.tasks.decoding import Sampling
from taskserve.server.tasks.text_generation import FinishReason, GenerateParams

# OpenAI's finish reasons: an end-of-sequence token is a natural stop, like a stop string.
FINISH_REASONS = {FinishReason.LENGTH: "length", FinishReason.STOP: "stop", FinishReason.EOS: "stop"}


def unsupported(param: str, message: str) -> HttpError:
    """A field OpenAI defines that this server does not honour: 400, naming the field."""
    return HttpError(400, message, code="unsupported_parameter", param=param)


class _Request(BaseModel):
    # Unknown fields are ignored, as OpenAI's own API does for fields of newer SDKs.
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampled(_Request):
    model: str
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    # An extension (vLLM, TGI): 0 means no limit.
    top_k: int = Field(default=0, ge=0)
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    def generate_params(self, max_tokens: int | None) -> GenerateParams:
        """The decoding settings, after refusing what this server does not do."""
        if self.n != 1:
            raise unsupported(
                "n", f"n={self.n}: this server returns one choice per request; send n=1 (or leave it out)"
            )
        if self.logprobs:
            raise unsupported("logprobs", "logprobs are not returned by this server; leave logprobs out")
        if self.presence_penalty or self.frequency_penalty or self.logit_bias:
            raise unsupported(
                "presence_penalty",
                "presence_penalty, frequency_penalty and logit_bias are not supported; leave them out",
            )
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidInput(f"seed must be between 0 and 2**63 - 1, got {self.seed}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        sampling = Sampling(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=self.seed)
        return GenerateParams(max_new_tokens=max_tokens or 0, sampling=sampling, stop=stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ContentPart(_Request):
    type: str
    text: str | None = None


class Message(_Request):
    role: str
    content: str | list[ContentPart] | None = None

    def chat_message(self, index: int) -> ChatMessage:
        if isinstance(self.content, list):
            texts = []
            for part in self.content:
                if part.type != "text" or part.text is None:
                    raise unsupported(
                        "messages",
                        f"messages[{index}].content holds a {part.type[:40]!r} part; this server reads text parts only",
                    )
                texts.append(part.text)
            return ChatMessage(self.role, "".join(texts))
        return ChatMessage(self.role, self.content or "")


class ChatCompletionRequest(_Sampled):
    messages: list[Message]
    max_completion_tokens: int | None = Field(default=None, ge=0)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def params(self) -> tuple[list[ChatMessage], GenerateParams]:
        if self.tools:
            raise unsupported("tools", "tools (function calling) are not supported by this server; leave tools out")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise unsupported("response_format", "response_format other than text is not supported; leave it out")
        if not self.messages:
            raise InvalidInput("messages is empty; send at least one message")
        messages = [m.chat_message(i) for i, m in enumerate(self.messages)]
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return messages, self.generate_params(max_tokens)


class CompletionRequest(_Sampled):
    prompt: str | list[str]
    # OpenAI's default for completions is 16 new tokens.
    max_tokens: int | None = Field(default=16, ge=0)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def params(self) -> tuple[str, GenerateParams]:
        if self.echo or self.suffix:
            raise unsupported("echo", "echo and suffix are not supported by this server; leave them out")
        if self.best_of not in (None, 1):
            raise unsupported(
                "best_of", f"best_of={self.best_of}: this server returns one completion; leave best_of out"
            )
        prompt = self.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise unsupported(
                    "prompt", f"prompt holds {len(prompt)} texts; this server completes one prompt per request"
                )
            prompt = prompt[0]
        return prompt, self.generate_params(self.max_tokens)


class EmbeddingRequest(_Request):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None

    def texts(self) -> list[str]:
        if isinstance(self.input, str):
            return [self.input]
        if not all(isinstance(item, str) for item in self.input):
            raise unsupported("input", "input holds token ids; this server embeds text: send strings")
        return [str(item) for item in self.input]


class ImageGenerationRequest(_Request):
    model: str
    prompt: str
    n: int = Field(default=1, ge=1)
    size: str | None = None
    response_format: str | None = "b64_json"
    output_format: str | None = None
    # Extensions (send them with the SDK's extra_body): the pipeline's own knobs.
    steps: int | None = Field(default=None, ge=1)
    negative_prompt: str = ""
    guidance_scale: float | None = None
    seed: int | None = Field(default=None, ge=0)

    def size_pixels(self) -> tuple[int, int]:
        """(width, height); (0, 0) is the model's default size."""
        if self.size in (None, "", "auto"):
            return 0, 0
        width, sep, height = self.size.partition("x")
        if not sep or not width.isdigit() or not height.isdigit():
            raise InvalidInput(f"size {self.size[:40]!r} is not WIDTHxHEIGHT (e.g. 512x512) or 'auto'")
        return int(width), int(height)

    def check_formats(self) -> None:
        if self.response_format not in (None, "b64_json"):
            raise unsupported(
                "response_format",
                f"response_format {self.response_format[:20]!r}: this server returns images inline; use b64_json",
            )
        if self.output_format not in (None, "png"):
            raise unsupported(
                "output_format", f"output_format {self.output_format[:20]!r}: this server returns PNG; use png"
            )
