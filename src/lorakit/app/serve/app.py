"""The HTTP side of ``lorakit serve``: a FastAPI app with OpenAI's routes over one ``Engine``.

Every answer that is not a success is OpenAI's error body with a 4xx/5xx status; an unexpected
exception becomes a 500 body and the server keeps serving. With an API key, every ``/v1`` route
needs ``Authorization: Bearer KEY`` (compared in constant time); ``/health`` and ``/metrics`` do not.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from lorakit.errors import ServeError

from ..models import prompt_format, read_metadata
from . import completions, protocol
from .engine import Engine
from .metrics import Metrics
from .registry import Registry

log = logging.getLogger("lorakit.serve")
MAX_BODY = 1 << 20  # bytes; a prompt that fits the context is far smaller


class Server:
    """What the routes share: the engine, the adapter registry, the tokenizer and the limits."""

    def __init__(self, engine: Engine, registry: Registry, metrics: Metrics, tokenizer, base_meta: dict, *,
                 api_key: str | None, allow_runtime_loading: bool, max_new_tokens: int) -> None:
        self.engine, self.registry, self.metrics, self.tokenizer = engine, registry, metrics, tokenizer
        self.base_id, self.context = registry.base_id, engine.context
        self.api_key = api_key.encode() if api_key else None
        self.allow_runtime_loading, self.max_new_tokens = allow_runtime_loading, max_new_tokens
        self.base_format = prompt_format(base_meta, tokenizer)
        self.formats: dict[str, dict] = {}
        self.started = int(time.time())
        self.draining = False

    def adapter_for(self, model: str) -> str | None:
        """The adapter a request's ``model`` names (None: the base model).

        Raises:
            ServeError: 404 for a model that is neither the base id nor a servable adapter.
        """
        if model == self.base_id:
            return None
        if self.registry.known(model) is not None:  # a loaded adapter whose folder was deleted since: 404
            return model
        raise ServeError(404, f"the model {model!r} does not exist", "model", code="model_not_found")

    def prompt_format(self, adapter: str | None) -> dict:
        """The prompt format recorded with the adapter (its lorakit.json), else the base model's."""
        if adapter is None:
            return self.base_format
        if adapter not in self.formats:
            entry = self.registry.entries.get(adapter) or self.registry.known(adapter)
            try:
                meta = read_metadata(entry.path) if entry else {}
            except Exception:  # noqa: BLE001 - a broken lorakit.json: the base's format
                meta = {}
            self.formats[adapter] = prompt_format(meta, self.tokenizer) if meta.get("prompt_format") else self.base_format
        return self.formats[adapter]

    def count(self, model: str, status: int) -> None:
        known = model == self.base_id or self.registry.known(model) is not None
        self.metrics.requests.labels(model if known else "(unknown)", str(status)).inc()

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip().encode() if header[:7].lower() == "bearer " else b""
        if not hmac.compare_digest(given, self.api_key):
            raise ServeError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')", code="invalid_api_key")

    def cards(self) -> list[dict]:
        base = {"id": self.base_id, "object": "model", "created": self.started, "owned_by": "lorakit",
                "root": self.registry.base_reference, "parent": None, "max_model_len": self.context}
        return [base] + [{"id": e.name, "object": "model", "created": e.created or self.started, "owned_by": "lorakit",
                          "root": str(e.path), "parent": self.base_id} for e in self.registry.listing()]


async def read_body(request: Request, limit: int = MAX_BODY) -> bytes:
    """The request body, refused with 413 once it passes ``limit`` bytes (never read whole)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ServeError(413, f"the request body is {int(declared)} bytes; at most {limit}", code="body_too_large")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ServeError(413, f"the request body is over {limit} bytes", code="body_too_large")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ServeError(400, "the client disconnected while sending the body", code="client_disconnected") from None
    return b"".join(chunks)


def _error(status: int, message: str, param=None, code=None) -> JSONResponse:
    return JSONResponse(protocol.error_body(status, message, param, code), status_code=status)


def create_app(server: Server) -> FastAPI:
    """The FastAPI app over ``server`` (its engine must be started by the caller)."""
    def guard(request: Request) -> None:  # every route: 503 while shutting down, the API key on /v1
        if server.draining and request.url.path != "/metrics":
            raise ServeError(503, "the server is shutting down", code="shutting_down")
        if request.url.path.startswith("/v1"):
            server.check_key(request)

    # a dependency, not an HTTP middleware: Starlette's middleware hides client disconnects from routes
    app = FastAPI(title="lorakit serve", version="1", docs_url=None, redoc_url=None, dependencies=[Depends(guard)])
    app.state.server = server

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, e: ServeError):
        log.info("%s %s status=%d %s", request.method, request.url.path, e.status, e)
        server.count(getattr(request.state, "model", "(unknown)"), e.status)
        return _error(e.status, str(e), e.param, e.code)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return _error(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        return _error(400, str(e))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return _error(500, f"internal error: {type(e).__name__}", code="internal_error")

    _routes(app, server)
    described = app.openapi  # FastAPI's generator (cached), then the request bodies it cannot see

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = protocol.openapi_bodies(described())
        return app.openapi_schema

    app.openapi = openapi
    return app


def _routes(app: FastAPI, server: Server) -> None:
    @app.get("/health")
    async def health():
        return {"status": "ok", "running": len(server.engine.batch), "waiting": len(server.engine.waiting),
                "resident": sorted(server.registry.resident)}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": server.cards()}

    @app.post("/v1/completions")
    async def create_completion(request: Request):
        return await _generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: Request):
        return await _generate(request, chat=True)

    async def _generate(request: Request, chat: bool):
        body = protocol.parse_json(await read_body(request))
        if isinstance(body.get("model"), str):
            request.state.model = body["model"]
        return await completions.create(server, body, chat, request.is_disconnected)

    if server.allow_runtime_loading:
        _admin_routes(app, server)


def _admin_routes(app: FastAPI, server: Server) -> None:
    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        body = protocol.parse_json(await read_body(request))
        reg = server.registry
        name = reg.check_name(body.get("lora_name"), "lora_name")
        if name in reg.resident or reg.known(name) is not None:
            raise ServeError(400, f"the adapter {name!r} has already been loaded", "lora_name", code="adapter_exists")
        path = reg.resolve(body.get("lora_path"))
        config, tensors = await asyncio.to_thread(reg.read, path)
        fut = server.engine.call(lambda: _install_new(server, name, path, config, tensors))
        await asyncio.wrap_future(fut)
        server.formats.pop(name, None)
        log.info("loaded adapter %s from %s", name, path)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        body = protocol.parse_json(await read_body(request))
        name = body.get("lora_name")
        if not isinstance(name, str) or not name:
            raise ServeError(400, "lora_name must be a non-empty string", "lora_name")
        await asyncio.wrap_future(server.engine.call(lambda: server.engine.uninstall(name)))
        server.formats.pop(name, None)
        log.info("unloaded adapter %s", name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


def _install_new(server: Server, name: str, path: Path, config, tensors) -> None:
    if name in server.registry.entries or name in server.registry.resident:  # a concurrent load won
        raise ServeError(400, f"the adapter {name!r} has already been loaded", "lora_name", code="adapter_exists")
    server.engine.install(name, path, config, tensors)

