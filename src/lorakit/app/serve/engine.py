"""Continuous (iteration-level) batching across adapters, on one thread that owns the model.

Each iteration: run queued admin jobs and apply adapter files read in the background; admit
waiting requests whose adapter is resident (starting a background read, and evicting the least
recently used idle adapter, for one that is not); prefill the admitted prompts in one left-padded
batch; then one decoding forward for every live sequence, each row routed to its own adapter by
``lorakit.mixed_batch``. A request arriving mid-generation joins at the next iteration, and a
finished sequence leaves at once (Yu et al. 2022, Orca; S-LoRA, Sheng et al. 2023).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import traceback
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from lorakit import delete_adapter, load_adapter_tensors, mixed_batch, set_rows
from lorakit.errors import LoRAError, NonFiniteError, ServeError

from .batch import Request, RunningBatch, Sequence, prefill_inputs
from .decode import Sampler, TextStream, choice_seed
from .metrics import Metrics
from .registry import Registry

log = logging.getLogger("lorakit.serve")


class Engine:
    """The model's owner thread (see the module docstring)."""

    def __init__(self, model, tokenizer, registry: Registry, metrics: Metrics, max_batch: int, max_queue: int,
                 context: int) -> None:
        self.model, self.tokenizer, self.registry, self.metrics = model, tokenizer, registry, metrics
        self.max_batch, self.max_queue, self.context = max_batch, max_queue, context
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.eos = {tokenizer.eos_token_id} | set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.eos.discard(None)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.batch = RunningBatch()
        self.waiting: deque[Request] = deque()
        self.jobs: deque[tuple] = deque()
        self.reads: dict[str, Future] = {}
        self.readers = ThreadPoolExecutor(1, thread_name_prefix="lorakit-read")
        self.wake = threading.Condition()
        self.accepting, self.running = True, False
        self.thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
        self._block: contextlib.ExitStack | None = None
        self._block_names: list | None = None

    # --- the public side (any thread) --------------------------------------------------------

    def start(self) -> None:
        self.running = True
        self.thread.start()

    def submit(self, req: Request) -> None:
        """Queue a request.

        Raises:
            ServeError: 503 while shutting down, 429 when ``max_queue`` requests wait.
        """
        with self.wake:
            if not self.accepting:
                raise ServeError(503, "the server is shutting down", code="shutting_down")
            if len(self.waiting) >= self.max_queue:
                raise ServeError(429, f"the queue is full ({self.max_queue} requests wait)", code="queue_full")
            self.waiting.append(req)
            self.metrics.queue.set(len(self.waiting))
            self.wake.notify()

    def call(self, fn) -> Future:
        """Run ``fn()`` on the engine thread between two steps; its result or exception in the future."""
        fut: Future = Future()
        with self.wake:
            self.jobs.append((fn, fut))
            self.wake.notify()
        return fut

    def busy(self) -> set[str]:
        """Adapters with a request running or waiting (not to be evicted or unloaded)."""
        with self.wake:
            return {s.adapter for s in self.batch.seqs} | {r.adapter for r in self.waiting}

    def drain(self, timeout: float) -> None:
        """Stop accepting, let queued and running requests finish (up to ``timeout`` s), stop."""
        with self.wake:
            self.accepting = False
        end = time.monotonic() + timeout
        while time.monotonic() < end and (self.waiting or self.batch.seqs) and self.thread.is_alive():
            time.sleep(0.05)
        with self.wake:
            self.running = False
            self.wake.notify()
        self.thread.join(timeout=max(1.0, end - time.monotonic()))
        self.readers.shutdown(wait=False, cancel_futures=True)

    # --- the engine thread -------------------------------------------------------------------

    def _loop(self) -> None:
        while self.running:
            try:
                self._iterate()
            except Exception as e:  # noqa: BLE001 - a failed step fails its requests, never the server
                log.error("engine step failed: %s\n%s", e, traceback.format_exc())
                self._fail_batch(ServeError(500, f"generation failed: {type(e).__name__}: {e}", code="engine_error"))

    def _iterate(self) -> None:
        self._run_jobs()
        self._apply_reads()
        self._trim(set())
        new = self._admit()
        with torch.no_grad():
            if new:
                self._prefill_or_fail(new)
            if self.batch.seqs:
                self._decode()
        if not new and not self.batch.seqs:
            with self.wake:
                if not self.jobs and self.running and not self._ready():
                    self.wake.wait(0.05 if self.reads else 1.0)

    def _ready(self) -> bool:
        return any(r.adapter is None or r.adapter in self.registry.resident for r in self.waiting)

    def _run_jobs(self) -> None:
        while self.jobs:
            with self.wake:
                fn, fut = self.jobs.popleft()
            self._close_block()
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                fut.set_exception(e)

    # --- adapters ------------------------------------------------------------------------------

    def install(self, name: str, path, config, tensors, pinned: bool = False) -> None:
        """Make an adapter resident (engine thread or before ``start``), evicting an idle one if
        the server is full; refused adapters leave the model unchanged.

        Raises:
            ServeError: 400 when the adapter does not fit the base model (the mismatch named), uses
                ``target_parameters``, which per-row batching (``mixed_batch``) does not support, or trains the
                base model's own biases (``bias`` other than "none": they would change every request).
        """
        if config.target_parameters:
            raise ServeError(400, f"adapter {name!r} uses target_parameters ({config.target_parameters!r}), which "
                             "the server's per-row batching (mixed_batch) does not support", "lora_path",
                             code="invalid_adapter")
        if config.bias != "none":  # its biases are the base model's own: loading it would change every request
            raise ServeError(400, f"adapter {name!r} trains the base model's own biases (bias={config.bias!r}); the "
                             "server shares one base model, so it cannot serve it (merge it: lorakit merge)",
                             "lora_path", code="invalid_adapter")
        self._close_block()
        try:
            load_adapter_tensors(self.model, config, tensors, name, path)
        except LoRAError as e:
            raise ServeError(400, f"adapter {name!r} does not fit the base model: {e}", "lora_path",
                             code="invalid_adapter") from None
        self.registry.add(name, path, pinned)
        self.registry.resident.add(name)
        self.metrics.loads.inc()
        self.metrics.resident.set(len(self.registry.resident))
        self._trim({name})
        if self.registry.room() < 0 and not pinned and name not in self.busy():  # full of busy adapters:
            self._drop(name)  # keep it known, load it again when there is room

    def uninstall(self, name: str) -> None:
        """Forget a loaded adapter (``/v1/unload_lora_adapter``).

        Raises:
            ServeError: 404 when it is not loaded, 409 while requests use it.
        """
        if name not in self.registry.entries and name not in self.registry.resident:
            raise ServeError(404, f"adapter {name!r} is not loaded", "lora_name", code="model_not_found")
        if self.registry.entries[name].pinned:
            raise ServeError(400, f"adapter {name!r} was pinned with --adapter and stays loaded", "lora_name",
                             code="adapter_pinned")
        if name in self.busy() or name in self.registry.loading:
            raise ServeError(409, f"adapter {name!r} has requests in flight", "lora_name", code="adapter_busy")
        if name in self.registry.resident:
            self._drop(name)
        self.registry.entries.pop(name, None)

    def _drop(self, name: str) -> None:
        self._close_block()
        delete_adapter(self.model, name)
        self.registry.resident.discard(name)
        self.metrics.resident.set(len(self.registry.resident))

    def _trim(self, keep: set) -> None:
        """Evict idle adapters (least recently used first) while more than ``max_loaded`` are resident."""
        while self.registry.room() < 0 and self._evict(self.busy() | keep):
            pass

    def _evict(self, busy: set) -> bool:
        victim = self.registry.victim(busy)
        if victim is None:
            return False
        self._drop(victim)
        self.metrics.evictions.inc()
        log.info("evicted adapter %s", victim)
        return True

    def _start_read(self, name: str, busy: set) -> None:
        entry = self.registry.known(name)
        if entry is None:
            self._fail_waiting(name, ServeError(404, f"model {name!r} does not exist", "model", code="model_not_found"))
            return
        if self.registry.room() <= 0 and self.registry.victim(busy) is None:
            return  # every resident adapter is busy: wait for one to finish (evicted once the new one loaded)
        self.registry.add(name, entry.path)
        self.registry.loading.add(name)
        self.reads[name] = self.readers.submit(self.registry.read, entry.path, "model")

    def _apply_reads(self) -> None:
        for name in [n for n, f in self.reads.items() if f.done()]:
            fut = self.reads.pop(name)
            self.registry.loading.discard(name)
            try:
                config, tensors = fut.result()
                self.install(name, self.registry.entries[name].path, config, tensors)
                log.info("loaded adapter %s", name)
            except ServeError as e:
                e.param = "model"
                self._fail_waiting(name, e)
            except Exception as e:  # noqa: BLE001 - a broken folder fails its requests only
                self._fail_waiting(name, ServeError(400, f"adapter {name!r} cannot be loaded: {e}", "model"))

    # --- scheduling ------------------------------------------------------------------------------

    def _admit(self) -> list[Sequence]:
        free = self.max_batch - len(self.batch)
        busy = {s.adapter for s in self.batch.seqs}
        admitted: list[Sequence] = []
        with self.wake:
            pending = list(self.waiting)
        for req in pending:
            if req.cancelled:
                self._remove_waiting(req)
                continue
            name = req.adapter
            if name is not None and name not in self.registry.resident:
                if name not in self.registry.loading:
                    self._start_read(name, busy | {s.adapter for s in admitted})
                continue
            if req.rows > free:
                break
            free -= req.rows
            self._remove_waiting(req)
            if name is not None:
                self.registry.touch(name)
            try:
                admitted.extend(self._sequences(req))
            except Exception as e:  # noqa: BLE001 - a request the checks let through fails alone
                self._fail_request(req, e)
        return admitted

    def _sequences(self, req: Request) -> list[Sequence]:
        out = []
        for p, prompt in enumerate(req.prompts):
            for j in range(req.n):
                seed = None if req.seed is None else choice_seed(req.seed, j)
                out.append(Sequence(req, p * req.n + j, req.adapter, Sampler(req.temperature, req.top_p, seed),
                                    TextStream(self.tokenizer, req.stop), prompt, position=len(prompt) - 1))
        return out

    def _remove_waiting(self, req: Request) -> None:
        with self.wake:
            with contextlib.suppress(ValueError):
                self.waiting.remove(req)
            self.metrics.queue.set(len(self.waiting))

    # --- compute ---------------------------------------------------------------------------------

    def _enter(self, names: list) -> None:
        """Route rows to adapters: one ``mixed_batch`` block stays open between adapter loads and unloads
        (which close it), and a change of rows is ``set_rows`` in it (the block's factors are not checked
        again: nothing writes them while it is open)."""
        if self._block_names == names:
            return
        if self._block is not None:
            set_rows(self.model, names)
            self._block_names = names
            return
        block = contextlib.ExitStack()
        block.enter_context(mixed_batch(self.model, names))
        self._block, self._block_names = block, names

    def _close_block(self) -> None:
        if self._block is not None:
            block, self._block, self._block_names = self._block, None, None
            block.close()

    def _prefill(self, seqs: list[Sequence]) -> None:
        seqs.sort(key=lambda s: (s.adapter is None, s.adapter or ""))  # each adapter's rows consecutive: slices
        inputs = prefill_inputs([s.prompt for s in seqs], self.pad)
        self._enter([s.adapter for s in seqs])
        out = self.model(**inputs, use_cache=True, logits_to_keep=1)
        self.batch.add(seqs, out.cache, inputs["attention_mask"])
        for s in seqs:
            self.metrics.prompt_tokens.labels(self._label(s)).inc(s.position + 1)
        self._advance(seqs, out.logits[:, -1].float())

    def _prefill_or_fail(self, seqs: list[Sequence]) -> None:
        """``_prefill``; if it fails, the new sequences' requests get the error (they are not in the batch
        yet, so a failed step would leave them unanswered) and the running batch goes on decoding. Several
        requests that failed together are prefilled again one by one, so only the one at fault fails."""
        try:
            self._prefill(seqs)
            return
        except Exception as e:  # noqa: BLE001 - a failed prefill fails its own requests, never the server
            log.error("prefill failed: %s\n%s", e, traceback.format_exc())
            self._close_block()  # the block's rows were set for the failed prefill: entered afresh next step
            error = ServeError(500, f"generation failed: {type(e).__name__}: {e}", code="engine_error")
        requests = list({id(s.request): s.request for s in seqs}.values())
        joined = {id(s) for s in self.batch.seqs}
        if len(requests) > 1 and not any(id(s) in joined for s in seqs):  # none joined: each may try alone
            for req in requests:
                self._prefill_or_fail([s for s in seqs if s.request is req])
            return
        for req in requests:
            req.cancelled = True
            req.sink(None, error, None)

    def _decode(self) -> None:
        self._enter([s.adapter for s in self.batch.seqs])
        out = self.model(**self.batch.step_inputs(), use_cache=True)
        self.batch.cache = out.cache
        self._advance(self.batch.seqs, out.logits[:, -1].float())

    def _advance(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Choose the next token of each of ``seqs`` (row i of ``logits``), hand out its text, drop the rows
        that are done. Non-finite logits fail their request (greedy decoding emitted ``argmax`` of a NaN)."""
        finite = torch.isfinite(logits).all(dim=-1).tolist()  # one check for the batch
        for i, s in enumerate(seqs):
            if s.finish is None and not s.request.cancelled:
                try:
                    if not finite[i]:
                        raise NonFiniteError(f"model {self._label(s)!r} gave non-finite logits (NaN or inf) at "
                                             f"generated token {s.generated + 1}: its weights are too large or damaged")
                    self._emit(s, s.sampler.choose(logits[i]))
                except Exception as e:  # noqa: BLE001 - one row's failure fails its request only
                    self._fail_request(s.request, e)
        self.batch.keep([i for i, s in enumerate(self.batch.seqs) if s.finish is None and not s.request.cancelled])
        self.metrics.running.set(len(self.batch))

    def _emit(self, s: Sequence, token: int) -> None:
        req = s.request
        s.generated += 1
        req.generated += 1
        s.position += 1
        s.last = token
        self.metrics.tokens.labels(self._label(s)).inc()
        if req.first_token is None:
            req.first_token = time.perf_counter()
            self.metrics.ttft.observe(req.first_token - req.arrived)
        if token in self.eos and not req.ignore_eos:
            s.finish, delta = "stop", ""
        else:
            delta = s.text.push(token)
            if s.text.stopped:
                s.finish = "stop"
            elif s.generated >= req.max_tokens or s.position + 1 >= self.context:
                s.finish = "length"
        if s.finish is not None:
            delta += s.text.flush()
        if delta or s.finish is not None:
            req.sink(s.index, delta, s.finish)

    def _label(self, s: Sequence) -> str:
        return s.adapter if s.adapter is not None else self.registry.base_id

    # --- failures --------------------------------------------------------------------------------

    def _fail_waiting(self, name: str, error: ServeError) -> None:
        with self.wake:
            failed = [r for r in self.waiting if r.adapter == name]
        for r in failed:
            self._remove_waiting(r)
            r.sink(None, error, None)

    def _fail_request(self, req: Request, e: Exception) -> None:
        log.error("request failed: %s%s", e, "" if isinstance(e, LoRAError) else "\n" + traceback.format_exc())
        if not req.cancelled:
            req.cancelled = True  # its rows leave at the end of this step
            req.sink(None, ServeError(500, f"generation failed: {type(e).__name__}: {e}", code="engine_error"), None)

    def _fail_batch(self, error: ServeError) -> None:
        self._close_block()
        for req in {id(s.request): s.request for s in self.batch.seqs}.values():
            req.sink(None, error, None)
        self.batch = RunningBatch()
        self.metrics.running.set(0)
