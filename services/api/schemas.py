"""Request bodies of the OpenAI API subset herd serves (unknown fields are ignored, as OpenAI's
clients send optional ones freely). Extensions as in vLLM: top_k, min_p, repetition_penalty,
stop_token_ids, ignore_eos, cache_salt.

Types are strict, as the OpenAPI schema says: no `true` for a number, no "1" for an integer or a
boolean (an integral float such as 2.0 is an integer, as in JSON Schema)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from model.generate import SamplingParams

INT64 = 2**63 - 1


def _integral(v):
    return int(v) if isinstance(v, float) and v.is_integer() else v


def integer(**bounds):
    """An integer field's type (the bounds inside, so the schema shows them as minimum/maximum)."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


TokenId = integer(ge=0, le=2**31 - 1)
STRICT = ConfigDict(extra="ignore", strict=True, protected_namespaces=())
# Stop strings bound the per-token work of a request (the engine matches them in time linear in the
# new text, but builds their automaton once per request).
MAX_STOPS, MAX_STOP_LEN, MAX_STOP_CHARS = 16, 256, 1024
MAX_PROMPTS = 16  # prompts in one completions request
StopString = Annotated[str, Field(max_length=MAX_STOP_LEN)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class SamplingFields(BaseModel):
    model_config = STRICT
    model: str | None = Field(None, max_length=256)
    max_tokens: integer(ge=1, le=1_000_000) | None = None
    max_completion_tokens: integer(ge=1, le=1_000_000) | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: integer(ge=-1, le=1_000_000) | None = None
    n: integer(ge=1, le=1) = Field(1, description="only 1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOPS)] | None = Field(
        None, description=f"up to {MAX_STOPS} strings of up to {MAX_STOP_LEN} characters, {MAX_STOP_CHARS} in all"
    )
    stop_token_ids: list[TokenId] | None = Field(None, max_length=256)
    ignore_eos: bool = False
    seed: integer(ge=-INT64 - 1, le=INT64) | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0, allow_inf_nan=False)
    min_p: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    cache_salt: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="prefix-cache blocks are shared only between requests of equal salt",
    )
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops_bounded(cls, v):
        if isinstance(v, list) and sum(map(len, v)) > MAX_STOP_CHARS:
            raise ValueError(f"stop strings may hold {MAX_STOP_CHARS} characters in all")
        return v

    def sampling(self, max_tokens: int, default_temperature: float = 1.0) -> SamplingParams:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        temperature = default_temperature if self.temperature is None else self.temperature
        return SamplingParams(
            temperature=0.0 if temperature < 1e-5 else temperature,  # tiny temperatures overflow: greedy
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(0, self.top_k or 0),
            max_tokens=max_tokens,
            seed=None if self.seed is None else self.seed % 2**63,
            stop_ids=tuple(self.stop_token_ids or ()),
            stop_strings=tuple(s for s in stops if s),
            ignore_eos=self.ignore_eos,
            min_p=self.min_p or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logprobs=self.requested_logprobs,
        )

    @property
    def requested_logprobs(self) -> int | None:
        """None: no log-probabilities; N: the chosen token's and the N most likely (0-20)."""
        return None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    ) = Field(..., description=f"a string, token ids, or a list of up to {MAX_PROMPTS} of either")
    echo: bool = False
    logprobs: integer(ge=0, le=20) | None = Field(None, description="the chosen token's and the N most likely")
    suffix: str | None = Field(None, max_length=0, description="not supported")

    @property
    def requested_logprobs(self) -> int | None:
        return self.logprobs


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    logprobs: bool | None = None
    top_logprobs: integer(ge=0, le=20) | None = None
    add_generation_prompt: bool = True

    @property
    def requested_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


# --- response bodies (documented in the OpenAPI schema, which the fuzz test checks responses against) ---


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length", "abort"] | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length", "abort"] | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]
