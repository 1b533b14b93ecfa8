"""Real ``lorakit serve`` processes for the server tests: a tiny Llama folder, adapters with
random non-zero B, a server on 127.0.0.1 and an ephemeral port, and PEFT's greedy outputs as the
offline reference (computed outside lorakit)."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _tiny import tiny_model_folder  # noqa: E402

TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj"]
READY = re.compile(r"ready on http://127\.0\.0\.1:(\d+)")


def make_adapters(base: Path, folder: Path, names: list[str], seed: int = 0) -> None:
    """Save one PEFT-format adapter per name (r=4; lora_B random, so each changes the output)."""
    import lorakit
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    for i, name in enumerate(names):
        lorakit.inject(model, lorakit.LoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS), adapter_name=name)
        g = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if f".{name}.lora_" in n:
                    p.normal_(0, 0.4, generator=g)
        lorakit.save_adapter(model, folder / name, adapter_name=name)


def build_world(root: Path, names: list[str]) -> tuple[Path, Path]:
    """``(base model folder, adapter folder)`` under ``root``."""
    base = tiny_model_folder(root / "base")
    make_adapters(base, root / "adapters", names)
    return base, root / "adapters"


class ServerProcess:
    """``python -m lorakit.app.cli serve ...`` with ``--port 0``; ``url`` once it is ready."""

    def __init__(self, *args: str, env: dict | None = None, timeout: float = 120) -> None:
        cmd = [sys.executable, "-m", "lorakit.app.cli", "serve", "--host", "127.0.0.1", "--port", "0", *args]
        full_env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", **(env or {}))
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=full_env)
        self.lines: list[str] = []
        self.port = None
        ready = threading.Event()

        def pump() -> None:
            for line in self.proc.stderr:
                self.lines.append(line)
                m = READY.search(line)
                if m:
                    self.port = int(m.group(1))
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        ready.wait(timeout)
        if self.port is None:
            self.stop()
            raise RuntimeError("server did not start:\n" + "".join(self.lines))
        self.url = f"http://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, body=None, headers: dict | None = None, timeout: float = 60):
        """``(status, parsed JSON or text)`` of one raw HTTP request; ``body`` bytes or a JSON object."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        h = {"Content-Type": "application/json", **(headers or {})}
        try:
            conn.request(method, path, body=data, headers=h)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw.decode("utf-8", "replace")

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


class PeftReference:
    """Offline greedy outputs from PEFT (merged adapter, ``generate(do_sample=False)``), cached."""

    def __init__(self, base: Path, adapters: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.base, self.adapters = base, adapters
        self.tokenizer = AutoTokenizer.from_pretrained(base)
        self.model = AutoModelForCausalLM.from_pretrained(base).eval()
        self.cache: dict = {}
        self.lock = threading.Lock()

    def greedy(self, adapter: str | None, text: str, max_new_tokens: int) -> str:
        """The decoded continuation of ``text`` (special tokens skipped, not stripped)."""
        key = (adapter, text, max_new_tokens)
        with self.lock:
            if key not in self.cache:
                self.cache[key] = self._run(adapter, text, max_new_tokens)
            return self.cache[key]

    def _run(self, adapter, text, max_new_tokens) -> str:
        from peft import PeftModel

        model = self.model
        if adapter is not None:
            model = PeftModel.from_pretrained(self.model, self.adapters / adapter).merge_and_unload()
            self.model = type(self.model).from_pretrained(self.base).eval()  # merge_and_unload changed it
        ids = torch.tensor([self.tokenizer(text, add_special_tokens=False).input_ids])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                                 eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    def chat_text(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
