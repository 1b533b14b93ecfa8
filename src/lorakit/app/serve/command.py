"""``lorakit serve``: load the base model and the pinned adapters, start the engine thread, and
run uvicorn until SIGTERM / SIGINT, then finish the requests in flight and exit 0 (a second SIGINT: at once)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from lorakit.errors import ServeError, UsageError

from ..console import quiet_transformers
from ..models import DEFAULT_MODEL, load_base, read_metadata
from .registry import NAME

DEFAULT_PORT = 8000
log = logging.getLogger("lorakit.serve")


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    """The ``serve`` subcommand's flags."""
    p.add_argument("--model", default=DEFAULT_MODEL, help="base model: 'default' (SmolLM2-135M-Instruct), a "
                   "transformers folder or a .gguf file; its id in the API is this value")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="load an adapter folder at start and keep it resident (repeatable)")
    p.add_argument("--adapter-dir", help="every subfolder is an adapter servable by its name, loaded on first use; "
                   "run-time loads must lie inside it")
    p.add_argument("--max-loaded", type=int, help="adapters resident at once, least recently used evicted first "
                   "(default 16, or the number of --adapter, plus one with --adapter-dir or run-time loading)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (0: any free port; default 8000)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (default: $LORAKIT_API_KEY)")
    p.add_argument("--allow-runtime-loading", action="store_true",
                   help="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter")
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoding together (default 32)")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting before 429 (default 256)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="largest max_tokens, and its default (256)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds to finish requests in flight after SIGTERM / SIGINT (default 30)")


def _pinned(specs: list[str]) -> list[tuple[str, Path]]:
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--adapter takes NAME=PATH, got {spec!r}")
        if not Path(path).is_dir():
            raise UsageError(f"--adapter {spec!r}: folder {path!r} does not exist")
        if name in [n for n, _ in out]:
            raise UsageError(f"--adapter name {name!r} is given twice")
        out.append((name, Path(path).resolve()))
    return out


def _check(args: argparse.Namespace, pinned: list) -> None:
    for flag in ("max_batch", "max_queue", "max_new_tokens", "max_loaded"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    if args.adapter_dir and not Path(args.adapter_dir).is_dir():
        raise UsageError(f"--adapter-dir {args.adapter_dir!r} is not a folder")
    if not 0 <= args.shutdown_timeout < float("inf"):
        raise UsageError(f"--shutdown-timeout must be a number of seconds >= 0, got {args.shutdown_timeout}")
    if args.api_key is not None and not args.api_key.strip():
        raise UsageError("--api-key is empty (an unset variable?); omit it to serve without a key")
    for name, _ in pinned:
        if not NAME.fullmatch(name) or name == args.model:
            raise UsageError(f"--adapter name {name!r}: 1-128 letters, digits or ._:@+/- starting with a letter "
                             "or digit, not the base model's id")
    loadable = bool(args.adapter_dir or args.allow_runtime_loading)  # adapters beyond the pinned ones
    if args.max_loaded is None:
        args.max_loaded = max(16, len(pinned) + loadable)
    elif args.max_loaded < len(pinned) + loadable:
        raise UsageError(f"--max-loaded {args.max_loaded} leaves no room: {len(pinned)} pinned adapters"
                         + (" and adapters loaded on demand" if loadable else ""))


def _logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("lorakit serve: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False


def build(args: argparse.Namespace):
    """The started engine and the FastAPI app for ``args`` (pinned adapters loaded)."""
    from .app import Server, create_app
    from .engine import Engine
    from .metrics import Metrics
    from .registry import Registry

    pinned = _pinned(args.adapter)
    _check(args, pinned)
    quiet_transformers()
    lm = load_base(args.model)
    base_meta = read_metadata(lm.reference) if Path(lm.reference).is_dir() else {}
    context = int(getattr(lm.model.config, "max_position_embeddings", 0) or 2048)
    registry = Registry(args.adapter_dir, args.max_loaded, args.model, lm.reference)
    metrics = Metrics()
    engine = Engine(lm.model, lm.tokenizer, registry, metrics, args.max_batch, args.max_queue, context)
    for name, path in pinned:
        try:  # the name was checked by _check, before the model loaded
            config, tensors = registry.read(path, "--adapter")
            engine.install(name, path, config, tensors, pinned=True)
        except ServeError as e:
            raise UsageError(f"--adapter {name}={path}: {e}") from None
    api_key = args.api_key or os.environ.get("LORAKIT_API_KEY") or None
    server = Server(engine, registry, metrics, lm.tokenizer, base_meta, api_key=api_key,
                    allow_runtime_loading=args.allow_runtime_loading, max_new_tokens=args.max_new_tokens)
    engine.start()
    return server, create_app(server)


def _not_cancelled(record: logging.LogRecord) -> bool:
    """A log filter: not uvicorn's traceback of a request task it cancelled on a second signal."""
    return not (record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError))


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM / SIGINT; exit 0 after the requests in flight finish."""
    import uvicorn

    _logging()
    server, app = build(args)

    class _Uvicorn(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                log.info("ready on http://%s:%d (model %s, %d adapters resident)", host, port, server.base_id,
                         len(server.registry.resident))

        def handle_exit(self, sig, frame):
            if server.draining and sig == signal.SIGINT and not self.force_exit:  # uvicorn cancels the requests
                log.info("SIGINT again: exiting now, dropping the requests in flight")
                logging.getLogger("uvicorn.error").addFilter(_not_cancelled)
            elif not server.draining:
                log.info("%s: finishing requests in flight, then exiting (Ctrl-C again: exit now)",
                         signal.Signals(sig).name)
            server.draining = True
            server.engine.accepting = False
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=args.shutdown_timeout, lifespan="off")
    for sig in (signal.SIGINT, signal.SIGTERM):  # uvicorn re-raises the signal it handled: make that a no-op
        signal.signal(sig, lambda *_: None)
    uv = _Uvicorn(config)
    try:
        uv.run()
    finally:
        server.engine.drain(timeout=0 if uv.force_exit else args.shutdown_timeout)
    log.info("stopped")
    return 0
