"""``lorakit serve`` against bad requests: each gets its status and OpenAI's error body, the server
keeps serving, and the resident adapters stay as they were."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from _serve import PeftReference, ServerProcess, build_world, make_adapters
from _tiny import tiny_model_folder

KEY = "sk-matrix"
AUTH = {"Authorization": f"Bearer {KEY}"}
NAMES = ["good", "other"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_errors")
    base, adapters = build_world(root, NAMES)
    bad = adapters / "bad"  # nested: not servable by name, only as a lora_path
    bad.mkdir()
    shutil.copytree(adapters / "good", bad / "pickle")
    (bad / "pickle" / "adapter_model.safetensors").rename(bad / "pickle" / "adapter_model.bin")
    shutil.copytree(adapters / "good", bad / "truncated")
    w = bad / "truncated" / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    other_base = tiny_model_folder(root / "other_base", seed=1, hidden_size=48)
    make_adapters(other_base, bad, ["foreign"])
    outside = root / "outside"
    make_adapters(base, outside, ["escapee"])
    os.symlink(outside / "escapee", bad / "link_out")
    return root, base, adapters, outside


@pytest.fixture(scope="module")
def server(world):
    _, base, adapters, _ = world
    s = ServerProcess("--model", str(base), "--adapter", f"good={adapters / 'good'}", "--adapter-dir", str(adapters),
                      "--allow-runtime-loading", "--api-key", KEY, "--max-new-tokens", "200")
    yield s
    assert s.stop() == 0


def post(server, path, body, headers=AUTH):
    return server.request("POST", path, body, headers)


def completion(**kw):
    return {"model": "good", "prompt": "hello", "max_tokens": 4, **kw}


CASES = [
    # (id, path, body, status, param)
    ("unknown model", "/v1/completions", completion(model="nope"), 404, "model"),
    ("missing model", "/v1/completions", {"prompt": "hi"}, 400, "model"),
    ("missing prompt", "/v1/completions", {"model": "good"}, 400, "prompt"),
    ("mistyped max_tokens", "/v1/completions", completion(max_tokens="4"), 400, "max_tokens"),
    ("negative max_tokens", "/v1/completions", completion(max_tokens=-3), 400, "max_tokens"),
    ("zero max_tokens", "/v1/completions", completion(max_tokens=0), 400, "max_tokens"),
    ("huge max_tokens", "/v1/completions", completion(max_tokens=10**9), 400, "max_tokens"),
    ("temperature out of range", "/v1/completions", completion(temperature=7), 400, "temperature"),
    ("top_p zero", "/v1/completions", completion(top_p=0), 400, "top_p"),
    ("mistyped stream", "/v1/completions", completion(stream="yes"), 400, "stream"),
    ("n zero", "/v1/completions", completion(n=0), 400, "n"),
    ("empty prompt", "/v1/completions", completion(prompt=""), 400, "prompt"),
    ("token-id prompt", "/v1/completions", completion(prompt=[1, 2, 3]), 400, "prompt"),
    ("empty stop", "/v1/completions", completion(stop=""), 400, "stop"),
    ("logprobs", "/v1/completions", completion(logprobs=3), 400, "logprobs"),
    ("prompt longer than the context", "/v1/completions", completion(prompt="cat " * 400), 413, "prompt"),
    ("no messages", "/v1/chat/completions", {"model": "good", "messages": []}, 400, "messages"),
    ("bad role", "/v1/chat/completions", {"model": "good", "messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages.0.role"),
    ("messages not a list", "/v1/chat/completions", {"model": "good", "messages": "hi"}, 400, "messages"),
    ("body not JSON", "/v1/completions", b"{not json", 400, None),
    ("body not UTF-8", "/v1/completions", b'{"model": "\xff\xfe"}', 400, None),
    ("body a JSON list", "/v1/completions", b"[1, 2]", 400, None),
    ("10 MB body", "/v1/completions", b'{"model": "good", "prompt": "' + b"a" * (10 << 20) + b'"}', 413, None),
    ("load ../ path", "/v1/load_lora_adapter", {"lora_name": "x1", "lora_path": "../outside/escapee"}, 400,
     "lora_path"),
    ("load absolute path outside", "/v1/load_lora_adapter", {"lora_name": "x2", "lora_path": "ABS_OUTSIDE"}, 400,
     "lora_path"),
    ("load symlink out", "/v1/load_lora_adapter", {"lora_name": "x3", "lora_path": "bad/link_out"}, 400, "lora_path"),
    ("load pickle adapter", "/v1/load_lora_adapter", {"lora_name": "x4", "lora_path": "bad/pickle"}, 400, "lora_path"),
    ("load truncated safetensors", "/v1/load_lora_adapter", {"lora_name": "x5", "lora_path": "bad/truncated"}, 400,
     "lora_path"),
    ("load adapter for another base", "/v1/load_lora_adapter", {"lora_name": "x6", "lora_path": "bad/foreign"}, 400,
     "lora_path"),
    ("load a missing folder", "/v1/load_lora_adapter", {"lora_name": "x7", "lora_path": "bad/none"}, 404, "lora_path"),
    ("load a bad name", "/v1/load_lora_adapter", {"lora_name": "", "lora_path": "good"}, 400, "lora_name"),
    ("load a name twice", "/v1/load_lora_adapter", {"lora_name": "good", "lora_path": "other"}, 400, "lora_name"),
    ("unload a missing adapter", "/v1/unload_lora_adapter", {"lora_name": "ghost"}, 404, "lora_name"),
    ("unknown route", "/v1/embeddings", {"model": "good", "input": "x"}, 404, None),
    ("seed beyond 64 bits", "/v1/completions", completion(seed=2**64, temperature=1), 400, "seed"),
    ("negative seed", "/v1/completions", completion(seed=-1, temperature=1), 400, "seed"),
    ("JSON nested 100000 deep", "/v1/completions", b'{"model": "good", "x": ' + b"[" * 100000 + b"]" * 100000 + b"}",
     400, None),
    ("a 5000-digit number", "/v1/completions", b'{"model": "good", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}",
     400, None),
    ("lone surrogate in the prompt", "/v1/completions", b'{"model": "good", "prompt": "\\ud800x"}', 400, None),
    ("lone surrogate in a message", "/v1/chat/completions",
     b'{"model": "good", "messages": [{"role": "user", "content": "\\udfff"}]}', 400, None),
    ("lora_path with a NUL byte", "/v1/load_lora_adapter", {"lora_name": "x8", "lora_path": "a\u0000b"}, 400,
     "lora_path"),
    ("lora_path 5000 characters long", "/v1/load_lora_adapter", {"lora_name": "x9", "lora_path": "a" * 5000}, 400,
     "lora_path"),
    ("unload a pinned adapter", "/v1/unload_lora_adapter", {"lora_name": "good"}, 400, "lora_name"),
    ("JSON mode (response_format), which would be ignored", "/v1/chat/completions",
     {"model": "good", "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}},
     400, "response_format"),
    ("stream_options without stream", "/v1/completions", completion(stream_options={"include_usage": True}), 400,
     "stream_options"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_its_status_and_error_body(server, world, case):
    _, path, body, status, param = case
    if isinstance(body, dict) and body.get("lora_path") == "ABS_OUTSIDE":
        body = dict(body, lora_path=str(world[3] / "escapee"))
    before = server.request("GET", "/health")[1]["resident"]
    got, answer = post(server, path, body)
    assert got == status, answer
    err = answer["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["type"]
    if param is not None:
        assert err["param"] == param
    assert server.request("GET", "/health")[1]["resident"] == before
    ok, out = post(server, "/v1/completions", completion())
    assert ok == 200 and out["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}],
                         ids=["no key", "wrong key", "no Bearer"])
def test_api_key_is_required_on_v1(server, headers):
    status, body = post(server, "/v1/completions", completion(), headers=headers)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert server.request("GET", "/v1/models", headers=headers)[0] == 401
    assert server.request("GET", "/health")[0] == 200  # not behind the key


def test_a_lazily_loaded_broken_adapter_fails_only_its_requests(server, world):
    adapters = world[2]
    shutil.copytree(adapters / "bad" / "truncated", adapters / "broken")
    try:
        status, body = post(server, "/v1/completions", completion(model="broken"))
        assert status == 400 and body["error"]["param"] == "model" and "truncated" in body["error"]["message"]
        status, body = post(server, "/v1/completions", completion(model="broken", stream=True))  # was a 200 stream
        assert status == 400 and body["error"]["param"] == "model" and "truncated" in body["error"]["message"]
        openai = pytest.importorskip("openai")
        c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError, match="truncated"):
            list(c.chat.completions.create(model="broken", messages=[{"role": "user", "content": "hi"}], stream=True))
        assert "broken" not in server.request("GET", "/health")[1]["resident"]
        assert post(server, "/v1/completions", completion())[0] == 200
    finally:
        shutil.rmtree(adapters / "broken")


def test_load_use_and_unload_at_run_time(server, world):
    ref = PeftReference(world[1], world[2])
    status, text = post(server, "/v1/load_lora_adapter", {"lora_name": "extra", "lora_path": "other"})
    assert status == 200 and "extra" in text
    assert "extra" in [m["id"] for m in server.request("GET", "/v1/models", headers=AUTH)[1]["data"]]
    ok, out = post(server, "/v1/completions", completion(model="extra", max_tokens=6, temperature=0))
    assert ok == 200 and out["choices"][0]["text"] == ref.greedy("other", "hello", 6)
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "extra"})[0] == 200
    status, body = post(server, "/v1/completions", completion(model="extra"))
    assert status == 404 and body["error"]["code"] == "model_not_found"


def test_unloading_a_busy_adapter_is_refused_with_409(server):
    openai = pytest.importorskip("openai")
    assert post(server, "/v1/load_lora_adapter", {"lora_name": "busy", "lora_path": "other"})[0] == 200
    c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    stream = iter(c.completions.create(model="busy", prompt="hello", max_tokens=32, stream=True,
                                       extra_body={"ignore_eos": True}))
    next(stream)  # in flight now
    status, body = post(server, "/v1/unload_lora_adapter", {"lora_name": "busy"})
    assert status == 409 and body["error"]["code"] == "adapter_busy" and body["error"]["param"] == "lora_name"
    assert [ch.choices[0].finish_reason for ch in stream][-1] == "length"
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "busy"})[0] == 200


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
def test_a_client_that_disconnects_frees_its_rows(server, stream):
    import json
    import socket
    import time

    body = json.dumps(completion(max_tokens=200, ignore_eos=True, n=16, stream=stream)).encode()
    logged = len(server.lines)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    if stream:
        got = b""
        while b"data:" not in got:  # headers first, then the first event
            chunk = sock.recv(4096)
            assert chunk, got
            got += chunk
    else:
        time.sleep(0.3)  # the body read and the request queued (closing sooner is a disconnect mid-body)
    sock.close()
    for _ in range(100):  # bounded: the rows leave within a few steps
        if server.request("GET", "/health")[1]["running"] == 0:
            break
        time.sleep(0.1)
    assert server.request("GET", "/health")[1]["running"] == 0
    assert any("status=499" in line for line in server.lines[logged:]), server.lines[logged:]  # dropped early
    assert post(server, "/v1/completions", completion())[0] == 200


def test_a_tiny_temperature_is_greedy(server):
    greedy = post(server, "/v1/completions", completion(max_tokens=8, temperature=0))[1]["choices"][0]["text"]
    status, out = post(server, "/v1/completions", completion(max_tokens=8, temperature=1e-310))
    assert status == 200 and out["choices"][0]["text"] == greedy


def test_an_adapter_trained_on_a_quantised_base_is_served_with_a_warning(world, tmp_path, caplog):
    """As vLLM serves QLoRA adapters: on the full-precision base, saying so (lorakit.json's "quantize")."""
    import json
    import logging

    from lorakit.app.serve.registry import Registry

    _, base, adapters, _ = world
    folder = tmp_path / "qlora"
    shutil.copytree(adapters / "good", folder)
    (folder / "lorakit.json").write_text(json.dumps({"quantize": "nf4"}))
    reg = Registry(None, 4, "base", str(base))
    with caplog.at_level(logging.WARNING, logger="lorakit.serve"):
        config, tensors = reg.read(folder)
    assert tensors and "trained on a nf4-quantised base; served on this full-precision base" in caplog.text
    caplog.clear()
    reg.read(adapters / "good")
    assert "quantised" not in caplog.text


def test_a_failed_prefill_answers_its_requests_and_the_running_batch_goes_on(world):
    """Requests admitted in a prefill that raises were not in the running batch yet: they were dropped without
    an answer (their clients hung). Now they get the error, the requests already decoding finish, and a
    healthy request admitted with the failing one is prefilled again alone and succeeds."""
    import threading

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.app.serve.batch import Request
    from lorakit.app.serve.engine import Engine
    from lorakit.app.serve.metrics import Metrics
    from lorakit.app.serve.registry import Registry

    _, base, _, _ = world
    model, tok = AutoModelForCausalLM.from_pretrained(base).eval(), AutoTokenizer.from_pretrained(base)
    engine = Engine(model, tok, Registry(None, 4, "base", str(base)), Metrics(), 4, 16, 256)
    real, bad = engine._prefill, [7, 7, 7]

    def prefill(seqs):
        if any(s.prompt == bad for s in seqs):
            raise RuntimeError("injected prefill failure")
        return real(seqs)

    engine._prefill = prefill
    ends, done = {}, {k: threading.Event() for k in ("long", "bad", "after", "bad2", "beside")}

    def request(key, prompt, max_tokens):
        def sink(index, delta, finish):
            if index is None or finish is not None:
                ends[key] = delta if index is None else finish
                done[key].set()
        return Request(None, [prompt], 1, max_tokens, 0.0, 1.0, None, [], sink, ignore_eos=True)

    engine.start()
    try:
        engine.submit(request("long", [5, 6], 60))
        time.sleep(0.2)  # decoding now
        engine.submit(request("bad", bad, 4))
        assert done["bad"].wait(60), "the failed prefill's request got no answer"
        assert isinstance(ends["bad"], Exception) and "injected prefill failure" in str(ends["bad"])
        engine.submit(request("after", [9, 10], 4))
        assert done["long"].wait(60) and done["after"].wait(60)
        assert ends["long"] == "length" and ends["after"] == "length"  # the running request was not failed
        with engine.wake:  # admitted in one prefill: they failed together; now only the one at fault fails
            engine.waiting.extend([request("bad2", bad, 4), request("beside", [11, 12], 4)])
            engine.wake.notify()
        assert done["bad2"].wait(60) and done["beside"].wait(60)
        assert isinstance(ends["bad2"], Exception) and ends["beside"] == "length"
    finally:
        engine.drain(10)


def test_an_adapter_training_the_models_biases_is_refused_and_changes_nothing(world, tmp_path):
    """A ``bias != "none"`` adapter writes its biases into the one shared base model: served, it changed every
    other request's output, for good (and mixed_batch refused it beside other rows, failing them). It is now
    refused with 400, and the base model and the other adapters answer as before."""
    import lorakit
    from transformers import AutoModelForCausalLM

    _, base, adapters, _ = world
    folder = tmp_path / "adapters"
    shutil.copytree(adapters / "other", folder / "other")
    model = AutoModelForCausalLM.from_pretrained(base)
    lorakit.inject(model, lorakit.LoRAConfig(r=4, target_modules=["q_proj", "v_proj"], bias="all",
                                             init_lora_weights=False), adapter_name="biased")
    lorakit.save_adapter(model, folder / "biased", adapter_name="biased")
    s = ServerProcess("--model", str(base), "--adapter-dir", str(folder))
    try:
        before = {m: s.request("POST", "/v1/completions", completion(model=m, max_tokens=6, temperature=0))[1]
                  for m in (str(base), "other")}
        for stream in (False, True):
            status, body = s.request("POST", "/v1/completions", completion(model="biased", stream=stream))
            assert status == 400 and "trains the base model's own biases (bias='all')" in body["error"]["message"]
        for m, out in before.items():
            again = s.request("POST", "/v1/completions", completion(model=m, max_tokens=6, temperature=0))[1]
            assert again["choices"][0]["text"] == out["choices"][0]["text"]
        assert "biased" not in s.request("GET", "/health")[1]["resident"]
    finally:
        assert s.stop() == 0


def test_an_adapter_on_target_parameters_is_refused_at_load(world):
    """mixed_batch cannot route rows through ``target_parameters`` adapters, so the server refuses them (400)
    instead of failing every request for them later; the model keeps no trace of it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lorakit
    from lorakit.app.serve.engine import Engine
    from lorakit.app.serve.metrics import Metrics
    from lorakit.app.serve.registry import Registry
    from lorakit.errors import ServeError

    _, base, _, _ = world
    model, tok = AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base)
    engine = Engine(model, tok, Registry(None, 4, "base", str(base)), Metrics(), 4, 16, 256)
    config = lorakit.LoRAConfig(r=2, target_modules=[], target_parameters=["mlp.up_proj.weight"])
    with pytest.raises(ServeError, match="uses target_parameters") as e:
        engine.install("params", "somewhere", config, {})
    assert e.value.status == 400 and lorakit.list_adapters(model) == []


def test_an_evicted_adapter_whose_folder_was_deleted_is_no_longer_listed(world, tmp_path):
    """Once loaded, an --adapter-dir adapter stayed in /v1/models after its folder was deleted, and a request
    for it got a 400 about the missing file; now it is listed while resident (still servable from memory),
    and gone, a 404, once evicted."""
    from lorakit.app.serve.registry import Registry

    _, base, adapters, _ = world
    root = tmp_path / "adapters"
    shutil.copytree(adapters / "other", root / "gone")
    shutil.copytree(adapters / "other", root / "kept")
    reg = Registry(str(root), 4, "base", str(base))
    for name in ("gone", "kept"):
        reg.add(name, reg.known(name).path)
        reg.resident.add(name)
    shutil.rmtree(root / "gone")
    assert [e.name for e in reg.listing()] == ["gone", "kept"]  # resident: still served
    reg.resident.discard("gone")  # evicted
    assert [e.name for e in reg.listing()] == ["kept"] and reg.known("gone") is None


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_an_adapter_giving_non_finite_logits_fails_its_request_with_500_naming_it(server, world, temperature):
    """An adapter with huge finite weights (lora_B times 1e35) drives the logits to inf / NaN. Greedy decoding
    answered 200 with whatever ``argmax`` made of a NaN, and a sampled request a 500 with torch's
    ``multinomial`` message; both now get a 500 that names the model and says its logits were not finite,
    and the server goes on serving."""
    from safetensors.torch import load_file, save_file

    adapters = world[2]
    folder = adapters / f"huge{int(temperature)}"
    shutil.copytree(adapters / "good", folder)
    try:
        w = folder / "adapter_model.safetensors"
        tensors = load_file(w)
        save_file({k: t * 1e35 if "lora_B" in k else t for k, t in tensors.items()}, w)
        seen = len(server.lines)
        status, body = post(server, "/v1/completions", completion(model=folder.name, temperature=temperature, seed=1))
        assert status == 500, body
        message = body["error"]["message"]
        assert "non-finite logits" in message and repr(folder.name) in message and "multinomial" not in message
        for _ in range(50):  # the server's stderr is read by another thread: wait for the line (at most 5 s)
            log = "".join(server.lines[seen:])  # the cause is named: one log line, no traceback
            if "request failed" in log:
                break
            time.sleep(0.1)
        assert "request failed: model" in log and "Traceback" not in log, log
        ok, out = post(server, "/v1/completions", completion())
        assert ok == 200 and out["choices"][0]["finish_reason"] in ("stop", "length")
    finally:
        shutil.rmtree(folder)


def test_an_adapter_folder_named_as_the_base_id_is_neither_listed_nor_served_and_a_warning_says_so(world, tmp_path,
                                                                                                   caplog):
    """``--adapter-dir`` holding a folder named as the base model's id: /v1/models listed that id twice, and a
    request for it always got the base model. The folder is now left out, and a warning at startup names it."""
    import logging

    from lorakit.app.serve.registry import Registry

    _, base, adapters, _ = world
    shutil.copytree(adapters / "other", tmp_path / "base")
    shutil.copytree(adapters / "other", tmp_path / "kept")
    with caplog.at_level(logging.WARNING, logger="lorakit.serve"):
        reg = Registry(str(tmp_path), 4, "base", str(base))
    assert [e.name for e in reg.listing()] == ["kept"] and reg.known("base") is None
    assert any("named as the base model's id 'base'" in r.getMessage() for r in caplog.records)
