"""``lorakit serve`` against requests generated from its own OpenAPI document (schemathesis): bodies that fit
the documented request schemas and bodies that break them (wrong types, missing fields, out-of-range
numbers, odd strings) never get a 5xx, every refusal carries OpenAI's error body, and the server keeps
serving with its adapters as they were. A real uvicorn on 127.0.0.1, driven over HTTP."""

from __future__ import annotations

import itertools

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402

from _serve import ServerProcess, build_world  # noqa: E402

KEY = "sk-schema"
AUTH = {"Authorization": f"Bearer {KEY}"}
NAMES = ["good", "other"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base, adapters = build_world(tmp_path_factory.mktemp("serve_schema"), NAMES)
    s = ServerProcess("--model", str(base), "--adapter", f"good={adapters / 'good'}", "--adapter-dir", str(adapters),
                      "--allow-runtime-loading", "--api-key", KEY, "--max-new-tokens", "4", "--max-queue", "64")
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def api(server):
    status, doc = server.request("GET", "/openapi.json")
    assert status == 200
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        assert doc["paths"][path]["post"]["requestBody"]["required"] is True  # the generator has bodies to fill
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


_turn = itertools.count()


def _check(server, case) -> None:
    body = case.body if isinstance(case.body, dict) else None
    if body is not None and "model" in body and next(_turn) % 2:  # half of them reach a real adapter
        body["model"] = "good"
    response = case.call(headers=AUTH, timeout=60)
    assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
    if response.status_code >= 400 and case.path.startswith("/v1"):
        err = response.json()["error"]
        assert isinstance(err["message"], str) and err["message"] and {"type", "param", "code"} <= set(err)


@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=lambda m: m.value)
def test_no_generated_request_gets_a_server_error(server, api, mode):
    """Every operation of the document, 25 bodies each: fitting the schemas (positive) or breaking them
    (negative: wrong types, missing required fields, out-of-range values)."""
    operations = [result.ok() for result in api.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"}
    for op in operations:
        if mode == schemathesis.GenerationMode.NEGATIVE and op.method.upper() != "POST":
            continue  # nothing to break in a GET without parameters
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=op.as_strategy(generation_mode=mode))
        def run(case):
            _check(server, case)

        run()


def test_the_server_still_serves_with_its_adapters_after_the_generated_requests(server, api):
    status, health = server.request("GET", "/health")
    assert status == 200 and {"good"} <= set(health["resident"])
    status, out = server.request("POST", "/v1/completions", {"model": "good", "prompt": "abc", "max_tokens": 2},
                                 AUTH)
    assert status == 200 and out["usage"]["completion_tokens"] >= 1

