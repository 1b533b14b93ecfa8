"""OpenAI's wire format: request bodies (checked with pydantic, strict types), responses, stream
chunks and error bodies, in the shapes the official ``openai`` client and vLLM use."""

from __future__ import annotations

import json
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lorakit.errors import ServeError

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               409: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               503: "service_unavailable", 500: "server_error"}

# OpenAI fields lorakit cannot honour: refused when set to anything but their neutral value
UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
               "suffix": (None,), "tools": (None, []), "functions": (None, []), "logit_bias": (None, {}),
               "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
               "response_format": (None, {"type": "text"})}  # JSON mode / schemas: not honoured, so refused


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """``{"error": {"message", "type", "param", "code"}}`` (OpenAI's error shape)."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: dict | None = None
    n: int | None = Field(None, ge=1, le=16)
    ignore_eos: bool | None = False  # vLLM's extension: run to max_tokens


class CompletionRequest(_Request):
    prompt: str | list[str]


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class LoadAdapterRequest(BaseModel):  # vLLM's /v1/load_lora_adapter body (checked by the route itself)
    lora_name: str
    lora_path: str


class UnloadAdapterRequest(BaseModel):  # vLLM's /v1/unload_lora_adapter body
    lora_name: str


BODIES = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatRequest,
          "/v1/load_lora_adapter": LoadAdapterRequest, "/v1/unload_lora_adapter": UnloadAdapterRequest}


def openapi_bodies(doc: dict) -> dict:
    """FastAPI's OpenAPI document ``doc`` with each POST route's JSON request body described (the routes read
    raw bytes, to answer malformed bodies with OpenAI's error shape, so FastAPI cannot see their models),
    and the bearer API key as the /v1 routes' security scheme."""
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for path, model in BODIES.items():
        op = doc.get("paths", {}).get(path, {}).get("post")
        if op is None:  # the load/unload routes exist only with --allow-runtime-loading
            continue
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
        op["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
    doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, item in doc.get("paths", {}).items():
        for op in item.values():
            if path.startswith("/v1"):
                op["security"] = [{"bearer": []}]
    return doc


def parse_json(raw: bytes) -> dict:
    """A request body -> its JSON object.

    Raises:
        ServeError: 400 when the body is not UTF-8, not JSON (too deep, huge numbers, lone
            surrogates included), or not an object.
    """
    try:
        body = json.loads(raw.decode("utf-8"))
        json.dumps(body, ensure_ascii=False).encode("utf-8")  # "\\ud800" escapes decode to lone surrogates
    except UnicodeDecodeError as e:
        raise ServeError(400, f"the request body is not UTF-8 (byte {e.start})") from None
    except UnicodeEncodeError:
        raise ServeError(400, "the request body holds a lone UTF-16 surrogate escape (not a character)") from None
    except RecursionError:
        raise ServeError(400, "the request body is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, or an integer of more than 4300 digits
        raise ServeError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ServeError(400, "the request body must be a JSON object")
    return body


def parse(kind: type[_Request], body: dict) -> _Request:
    """A request's JSON object -> checked request.

    Raises:
        ServeError: 400 when a field is missing, mistyped or out of range (``param`` names it),
            or asks for an unsupported feature (logprobs, echo, ...).
    """
    try:
        req = kind.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"] if not _union_tag(x))
        raise ServeError(400, f"{loc or 'body'}: {err['msg']}", loc or None) from None
    for name, neutral in UNSUPPORTED.items():
        if name in body and body[name] not in neutral:
            raise ServeError(400, f"{name} is not supported by lorakit serve", name)
    if req.stream_options is not None and not req.stream:  # as OpenAI answers it
        raise ServeError(400, "stream_options is only allowed when stream is true", "stream_options")
    given = stops(req)
    if len(given) > 16 or any(not s for s in given):
        raise ServeError(400, "stop must be a non-empty string or a list of at most 16 non-empty strings", "stop")
    return req


def _union_tag(part) -> bool:
    """pydantic names the member of a union in an error's location ("str", "list[str]"): not a field."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "dict", "list", "none")
                                      or "[" in part or part.startswith("function-"))


def stops(req: _Request) -> list[str]:
    """The request's stop strings as a list."""
    return [req.stop] if isinstance(req.stop, str) else list(req.stop or [])


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def choice(chat: bool, index: int, text: str, finish: str | None, delta: bool = False, first: bool = False) -> dict:
    """One entry of ``choices``: a full answer, or (``delta``) a stream chunk's piece."""
    if not chat:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
    if delta:
        d = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        return {"index": index, "delta": d, "logprobs": None, "finish_reason": finish}
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
            "finish_reason": finish}


def envelope(chat: bool, rid: str, model: str, choices: list[dict], chunk: bool = False,
             use: dict | None = None) -> dict:
    """The response (or stream chunk) object around ``choices``."""
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
    out = {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": choices}
    if use is not None or not chunk:
        out["usage"] = use
    return out
