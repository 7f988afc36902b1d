"""The OpenAI-compatible request and response bodies, as strict pydantic models.

Requests are validated strictly (``"5"`` is not an integer, ``1`` is not a boolean) and
unknown fields are rejected, so a typo such as ``max_token`` is a 400 naming the field
instead of a silently ignored option. Fields OpenAI defines that lmstack cannot honour
(``logit_bias``, non-zero presence/frequency penalties, ``suffix``, ``echo``) are rejected
with a message naming them.

Every limit that does not depend on the model is stated here, so ``/openapi.json`` says
exactly what is accepted (schemathesis checks both directions): non-empty prompts, inputs
and stop strings, at most ``MAX_PROMPTS`` prompts, and the rules between fields as JSON
Schema ``dependentSchemas`` (``tool_choice`` other than ``none`` needs ``tools``,
``top_logprobs`` above 0 needs ``logprobs``). What only the backend can check (the
context length, token ids against the vocabulary, whether a JSON schema can be enforced,
tool names that must match) is a 400 from the backend with an error ``code``. The response
models document the API; handlers build the same shapes as plain dicts.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

MAX_N = 8
MAX_PROMPTS = 8  # with MAX_N, at most 64 choices a request
MAX_STOP = 4
MAX_TOP_LOGPROBS = 20
MAX_INPUTS = 256


def _integral(v):
    return int(v) if isinstance(v, float) and v.is_integer() else v


def Int(**bounds):
    """An integer within ``bounds`` (``ge``, ``le``). JSON Schema counts 2.0 as an integer, and so
    does the schema this server publishes; "2", true and 2.5 are still refused."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


NonEmptyStr = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[Int(ge=0)], Field(min_length=1)]


def _only(tp, value, why: str, schema: dict):
    """A type OpenAI defines more widely than lmstack honours: ``schema`` says what is accepted
    (only ``value``), and anything else is refused with ``why``."""

    def check(v):
        if v != value:
            raise PydanticCustomError("unsupported", why)
        return v

    return Annotated[tp, AfterValidator(check), Field(json_schema_extra=schema)]


_NOT_SUPPORTED = "not supported by this server"
ZeroPenalty = _only(float, 0.0, "only 0 is supported; use repetition_penalty (lmstack extension)",
                    {"minimum": 0, "maximum": 0})


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = Field(None, max_length=64)
    tool_calls: Optional[list[ToolCall]] = None
    tool_call_id: Optional[str] = None

    def text(self) -> Optional[str]:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content


class FunctionDef(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaSpec(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[bool] = None

    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaSpec] = Field(None, validate_default=True)

    model_config = ConfigDict(json_schema_extra={"anyOf": [  # json_schema (with its schema) when type is json_schema
        {"properties": {"type": {"enum": ["text", "json_object"]}}},
        {"required": ["json_schema"], "properties": {"json_schema": {"type": "object", "required": ["schema"],
                                                                     "properties": {"schema": {"type": "object"}}}}}]})

    @field_validator("json_schema")
    @classmethod
    def _schema_given(cls, v: Optional[JsonSchemaSpec], info: ValidationInfo) -> Optional[JsonSchemaSpec]:
        if info.data.get("type") == "json_schema" and (v is None or v.schema_ is None):
            raise PydanticCustomError("missing", "required when type is json_schema, with a schema")
        return v


class _Sampling(_Strict):
    model: Optional[str] = None
    max_tokens: Optional[Int(ge=0, le=1_000_000)] = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: Int(ge=1, le=MAX_N) = 1
    stop: Optional[Union[NonEmptyStr, Annotated[list[NonEmptyStr], Field(max_length=MAX_STOP)]]] = None
    seed: Optional[Int(ge=-(2**53), le=2**53)] = None  # what a JSON number holds exactly (and the schema)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: ZeroPenalty = 0.0
    frequency_penalty: ZeroPenalty = 0.0
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    ignore_eos: bool = False  # extension (as vLLM's): keep generating past end-of-sequence, up to max_tokens
    logit_bias: Optional[_only(dict[str, float], {}, _NOT_SUPPORTED, {"maxProperties": 0})] = None
    user: Optional[str] = None
    metadata: Optional[dict[str, str]] = None


class CompletionRequest(_Sampling):
    prompt: Union[NonEmptyStr, Annotated[list[NonEmptyStr], Field(min_length=1, max_length=MAX_PROMPTS)], TokenIds,
                  Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]]
    logprobs: Optional[Int(ge=0, le=MAX_TOP_LOGPROBS)] = None
    echo: _only(bool, False, _NOT_SUPPORTED, {"const": False}) = False
    suffix: Optional[_only(str, "", _NOT_SUPPORTED, {"maxLength": 0})] = None
    best_of: Optional[Int(ge=1, le=MAX_N)] = None

    model_config = ConfigDict(json_schema_extra={"dependentSchemas": {"best_of": {"anyOf": [  # best_of == n
        {"properties": {"best_of": {"type": "null"}}},
        *({"properties": {"best_of": {"const": k}, "n": {"const": k}}, **({"required": ["n"]} if k > 1 else {})}
          for k in range(1, MAX_N + 1))]}}})

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, v: Optional[int], info: ValidationInfo) -> Optional[int]:
        n = info.data.get("n", 1)
        if v is not None and v != n:
            raise PydanticCustomError("unsupported", "only best_of == n is supported (got best_of={v}, n={n})",
                                      {"v": v, "n": n})
        return v


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[Int(ge=0, le=1_000_000)] = None
    logprobs: bool = False
    top_logprobs: Optional[Int(ge=0, le=MAX_TOP_LOGPROBS)] = None
    tools: Optional[Annotated[list[Tool], Field(min_length=1)]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    parallel_tool_calls: Optional[bool] = None
    response_format: Optional[ResponseFormat] = None

    model_config = ConfigDict(json_schema_extra={"dependentSchemas": {
        # OpenAI's rule: tool_choice only with tools ("none" needs none)
        "tool_choice": {"anyOf": [{"properties": {"tool_choice": {"enum": ["none", None]}}},
                                  {"required": ["tools"], "properties": {"tools": {"type": "array"}}}]},
        "top_logprobs": {"anyOf": [{"properties": {"top_logprobs": {"enum": [0, None]}}},
                                   {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}]},
        # a response_format other than text, or tools the model may call: one or the other
        "response_format": {"anyOf": [
            {"properties": {"response_format": {"anyOf": [{"type": "null"},
                                                          {"properties": {"type": {"const": "text"}}}]}}},
            {"properties": {"tools": {"type": "null"}}},  # no tools (absent or null)
            {"required": ["tool_choice"], "properties": {"tool_choice": {"const": "none"}}}]}}})

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, v: Optional[int], info: ValidationInfo) -> Optional[int]:
        if v and not info.data.get("logprobs"):
            raise PydanticCustomError("dependency", "needs logprobs to be true")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _needs_tools(cls, v, info: ValidationInfo):
        if v is not None and v != "none" and not info.data.get("tools"):
            raise PydanticCustomError("dependency", "only allowed when tools are given")
        return v

    @field_validator("response_format")
    @classmethod
    def _not_with_tools(cls, v: Optional[ResponseFormat], info: ValidationInfo) -> Optional[ResponseFormat]:
        if v is not None and v.type != "text" and info.data.get("tools") and info.data.get("tool_choice") != "none":
            raise PydanticCustomError("conflict", "cannot be combined with tools; use one or the other")
        return v


class EmbeddingRequest(_Strict):
    input: Union[NonEmptyStr, Annotated[list[NonEmptyStr], Field(min_length=1, max_length=MAX_INPUTS)]]
    model: Optional[str] = None
    encoding_format: Literal["float"] = "float"
    dimensions: Optional[Int(ge=1)] = None
    user: Optional[str] = None


# -- responses (documentation for /openapi.json) ------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"]
    content: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None


class _Choice(BaseModel):
    index: int
    finish_reason: Optional[str] = None
    logprobs: Optional[dict[str, Any]] = None


class ChatChoice(_Choice):
    message: ChatResponseMessage


class CompletionChoice(_Choice):
    text: str


class _Answer(BaseModel):
    id: str
    created: int
    model: str
    usage: Usage


class ChatCompletion(_Answer):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]


class Completion(_Answer):
    object: Literal["text_completion"]
    choices: list[CompletionChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float]


class EmbeddingList(BaseModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: dict[str, int]


class Health(BaseModel):
    status: str
    detail: Optional[dict[str, Any]] = None
