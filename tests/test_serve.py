"""``lorakit serve`` end to end: a real uvicorn on 127.0.0.1, driven by the official ``openai``
client (sync, async, streaming) and raw HTTP; outputs checked against PEFT's offline greedy ones."""

from __future__ import annotations

import asyncio
import random
import signal
import threading
import time

import pytest

from _serve import PeftReference, ServerProcess, build_world

openai = pytest.importorskip("openai")

KEY = "sk-test-key"
NAMES = ["a0", "a1", "a2", "a3", "a4", "a5"]
PROMPTS = ["hello world", "cat K AE1 T", "dog", "tiny T AY1", "Give the ARPAbet pronunciation.", "abc xyz"]
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    base, adapters = build_world(root, NAMES)
    return root, base, adapters


@pytest.fixture(scope="module")
def ref(world):
    _, base, adapters = world
    return PeftReference(base, adapters)


@pytest.fixture(scope="module")
def server(world):
    """a0 pinned; a1..a5 lazily from --adapter-dir; at most 3 resident; runtime loading on."""
    _, base, adapters = world
    s = ServerProcess("--model", str(base), "--adapter", f"a0={adapters / 'a0'}", "--adapter-dir", str(adapters),
                      "--max-loaded", "3", "--allow-runtime-loading", "--api-key", KEY, "--max-new-tokens", "64")
    yield s
    assert s.stop() == 0


def client(server, **kw):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, **kw)


def test_models_lists_base_and_every_servable_adapter(server, world):
    _, base, adapters = world
    models = client(server).models.list().data
    ids = [m.id for m in models]
    assert ids[0] == str(base) and sorted(ids[1:]) == NAMES
    card = {m.id: m for m in models}["a3"]
    assert card.object == "model" and card.owned_by == "lorakit"
    assert card.model_extra["root"] == str(adapters / "a3") and card.model_extra["parent"] == str(base)


def test_greedy_completion_equals_peft_offline(server, ref):
    c = client(server)
    for name in ["a0", "a2", None]:
        model = name or c.models.list().data[0].id
        r = c.completions.create(model=model, prompt="hello world", max_tokens=12, temperature=0)
        assert r.choices[0].text == ref.greedy(name, "hello world", 12)
        assert r.usage.prompt_tokens == len(ref.tokenizer("hello world").input_ids)
        assert r.usage.completion_tokens <= 12 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        assert r.choices[0].finish_reason in ("stop", "length")
    assert ref.greedy("a0", "hello world", 12) != ref.greedy("a2", "hello world", 12)  # the adapters matter


def test_chat_applies_the_template_and_streams(server, ref):
    c = client(server)
    messages = [{"role": "user", "content": "cat"}]
    r = c.chat.completions.create(model="a1", messages=messages, max_tokens=10, temperature=0)
    expected = ref.greedy("a1", ref.chat_text(messages), 10)
    assert r.choices[0].message.content == expected and r.choices[0].message.role == "assistant"
    chunks = list(c.chat.completions.create(model="a1", messages=messages, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == expected
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_completion_stream_and_stop_strings(server, ref):
    c = client(server)
    full = ref.greedy("a4", "dog", 20)
    text = "".join(ch.choices[0].text for ch in c.completions.create(
        model="a4", prompt="dog", max_tokens=20, temperature=0, stream=True))
    assert text == full
    stop = full[4:6]
    assert stop and full.find(stop) >= 0
    r = c.completions.create(model="a4", prompt="dog", max_tokens=20, temperature=0, stop=[stop, "never-seen"])
    assert r.choices[0].text == full[: full.find(stop)] and r.choices[0].finish_reason == "stop"
    chunks = list(c.completions.create(model="a4", prompt="dog", max_tokens=20, temperature=0, stop=stop, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == full[: full.find(stop)]


def test_async_client_concurrent_requests(server, ref):
    async def run():
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        jobs = [c.completions.create(model=NAMES[i % 3], prompt=PROMPTS[i], max_tokens=8, temperature=0)
                for i in range(6)]
        return await asyncio.gather(*jobs)

    for i, r in enumerate(asyncio.run(run())):
        assert r.choices[0].text == ref.greedy(NAMES[i % 3], PROMPTS[i], 8)


def test_sixteen_threads_random_adapters_match_offline(server, ref):
    """16 clients at once over 6 adapters with 3 resident: loads and evictions while others decode."""
    c = client(server, timeout=120)
    rng = random.Random(0)
    plan = [(rng.choice(NAMES + [None]), rng.choice(PROMPTS), rng.choice([4, 9, 16])) for _ in range(48)]
    base_id = c.models.list().data[0].id
    results: dict[int, str] = {}
    errors: list = []

    def worker(k: int) -> None:
        for i in range(k, len(plan), 16):
            name, prompt, n = plan[i]
            try:
                r = c.completions.create(model=name or base_id, prompt=prompt, max_tokens=n, temperature=0)
                results[i] = r.choices[0].text
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append((i, repr(e)))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert errors == []
    for i, (name, prompt, n) in enumerate(plan):
        assert results[i] == ref.greedy(name, prompt, n), (i, name, prompt)
    status, health = server.request("GET", "/health")
    assert status == 200 and len(health["resident"]) <= 3 and "a0" in health["resident"]


def test_lazy_load_and_lru_eviction(server):
    c = client(server)

    def metric(name: str) -> float:
        _, text = server.request("GET", "/metrics")
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))

    for name in ["a3", "a4", "a5"]:
        c.completions.create(model=name, prompt="dog", max_tokens=2, temperature=0)
    assert set(server.request("GET", "/health")[1]["resident"]) == {"a0", "a4", "a5"}  # a0 pinned, a3 oldest
    loads, evictions = metric("lorakit_adapter_loads_total"), metric("lorakit_adapter_evictions_total")
    c.completions.create(model="a3", prompt="dog", max_tokens=2, temperature=0)
    assert set(server.request("GET", "/health")[1]["resident"]) == {"a0", "a5", "a3"}  # a4 now least recent
    assert metric("lorakit_adapter_loads_total") == loads + 1
    assert metric("lorakit_adapter_evictions_total") == evictions + 1
    c.completions.create(model="a5", prompt="dog", max_tokens=2, temperature=0)
    assert metric("lorakit_adapter_loads_total") == loads + 1  # resident: no load


def test_a_refused_adapter_evicts_nothing(server, world):
    """Three resident (the limit): a lazily loaded adapter that fails its checks leaves them all in place."""
    import shutil

    _, _, adapters = world
    c = client(server)
    for name in ["a1", "a2"]:
        c.completions.create(model=name, prompt="dog", max_tokens=2, temperature=0)
    before = server.request("GET", "/health")[1]["resident"]
    assert len(before) == 3
    shutil.copytree(adapters / "a3", adapters / "broken")
    weights = adapters / "broken" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    try:
        with pytest.raises(openai.BadRequestError, match="truncated"):
            c.completions.create(model="broken", prompt="dog", max_tokens=2)
        status, body = server.request("POST", "/v1/load_lora_adapter", {"lora_name": "b2", "lora_path": "broken"},
                                      AUTH)
        assert status == 400 and "truncated" in body["error"]["message"]
        assert server.request("GET", "/health")[1]["resident"] == before
    finally:
        shutil.rmtree(adapters / "broken")


def test_sampling_is_reproducible_with_a_seed_and_n(server):
    c = client(server)
    kw = dict(model="a0", prompt="hello", max_tokens=12, temperature=1.5, top_p=0.9, seed=7, n=3)
    r1, r2 = c.completions.create(**kw), c.completions.create(**kw)
    assert [ch.text for ch in r1.choices] == [ch.text for ch in r2.choices]
    assert sorted(ch.index for ch in r1.choices) == [0, 1, 2]
    assert len({ch.text for ch in r1.choices}) > 1  # each choice its own draw
    single = c.completions.create(**dict(kw, n=1))
    assert single.choices[0].text == r1.choices[0].text  # the first choice is what n=1 gives
    nearby = [c.completions.create(**dict(kw, seed=s, n=1)).choices[0].text for s in (8, 9)]
    assert not set(nearby) & {ch.text for ch in r1.choices[1:]}  # choice j was seed + j's answer


def test_choice_seeds_by_hand():
    """Choice 0 keeps the request's seed; the others take 63 bits of BLAKE2b of "seed:j" (``hashlib``)."""
    import hashlib

    from lorakit.app.serve.decode import choice_seed

    assert choice_seed(7, 0) == 7
    want = int.from_bytes(hashlib.blake2b(b"7:1", digest_size=8).digest(), "big") >> 1
    assert choice_seed(7, 1) == want and 0 <= want < 2 ** 63 and choice_seed(8, 0) != choice_seed(7, 1)


def test_metrics_and_request_log(server):
    status, text = server.request("GET", "/metrics")
    assert status == 200
    for name in ["lorakit_requests_total", "lorakit_generated_tokens_total", "lorakit_queue_depth",
                 "lorakit_resident_adapters", "lorakit_adapter_loads_total", "lorakit_adapter_evictions_total",
                 "lorakit_time_to_first_token_seconds_bucket"]:
        assert name in text
    assert 'lorakit_requests_total{model="a0",status="200"}' in text
    assert any("completion a0 status=200" in line and "completion_tokens=" in line for line in server.lines)


def test_full_queue_answers_429_and_sigterm_finishes_requests_in_flight(world):
    _, base, adapters = world
    s = ServerProcess("--model", str(base), "--adapter", f"a1={adapters / 'a1'}", "--max-batch", "1",
                      "--max-queue", "1", "--max-new-tokens", "240")
    try:
        body = {"model": "a1", "prompt": "x", "max_tokens": 120, "temperature": 0, "ignore_eos": True}
        statuses: list[int] = []
        gate = threading.Barrier(6)

        def send() -> None:
            gate.wait(30)
            statuses.append(s.request("POST", "/v1/completions", body)[0])

        threads = [threading.Thread(target=send) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert 429 in statuses and 200 in statuses and set(statuses) <= {200, 429}
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=120)
        stream = c.completions.create(model="a1", prompt="hello", max_tokens=240, temperature=0, stream=True,
                                      extra_body={"ignore_eos": True})
        chunks = [next(iter(stream))]
        s.proc.send_signal(signal.SIGTERM)
        chunks += list(stream)
        assert chunks[0].choices[0].finish_reason is None and chunks[-1].choices[0].finish_reason == "length"
        assert s.proc.wait(120) == 0
        assert any("SIGTERM" in line for line in s.lines)
    finally:
        s.stop(signal.SIGKILL)


def test_a_second_sigint_exits_at_once_without_tracebacks(world):
    """The first SIGINT drains; a second one (Ctrl-C twice) makes uvicorn cancel the requests' tasks, which
    printed a CancelledError traceback per open stream. Now it says so in one line and exits cleanly."""
    _, base, adapters = world
    s = ServerProcess("--model", str(base), "--adapter", f"a1={adapters / 'a1'}", "--max-new-tokens", "240")
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=120)
        streams = [c.completions.create(model="a1", prompt=p, max_tokens=240, temperature=0, stream=True,
                                        extra_body={"ignore_eos": True}) for p in ("a", "b", "c")]
        for st in streams:
            next(iter(st))  # every stream open, its first token sent
        s.proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
        s.proc.send_signal(signal.SIGINT)
        assert s.proc.wait(60) == 0
        time.sleep(0.5)  # the reader thread takes the last lines
        text = "".join(s.lines)
        assert "SIGINT again: exiting now" in text and "Traceback" not in text and "CancelledError" not in text, text
    finally:
        s.stop(signal.SIGKILL)
