"""The router service end to end on loopback: a registry with a promoted route of the sample's
intent step (a real PEFT adapter of the bundled base model), a fake fallback LLM, real HTTP."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import shutil
import stat
import time

import httpx
import numpy as np
import pytest
from starlette.testclient import TestClient

from pipeline import curate, ingest, promote, rawzone, sources, structured
from pipeline.calls import SharedInstructions, exclusive_system_prompts
from pipeline.router import RouteTable, RouterConfigError, SlmEngine, TraceWriter, answer_to_message
from pipeline.router_service import Router, RouterSettings, StreamedAnswer, serving, uvicorn_options
from tests.conftest import LANDING
from tests.fake_openai import FALLBACK_ANSWER, FakeOpenAI
from tests.router_setup import promoted_registry, step_route, untrained_adapter

TOKEN = "test-token-1"
ENCRYPTION_KEY = rawzone.new_keys()[rawzone.ENCRYPTION_KEY_ENV]
AUTH = {"authorization": f"Bearer {TOKEN}"}
UNRELATED = {"model": "gpt-4.1", "messages": [
    {"role": "system", "content": "You are a poet who writes short poems about nature."},
    {"role": "user", "content": "Write a haiku about autumn leaves falling in the rain."}]}


@pytest.fixture(scope="module")
def sample_calls(labels):
    """The first day of the sample, each call with its true step."""
    calls = ingest.read_calls([LANDING / "traces-2026-10-01.jsonl"]).traces
    return calls.assign(step=calls["trace_id"].map(lambda t: labels["records"].get(t, {}).get("step")))


def request_of(call, **extra) -> dict:
    body = {"model": "gpt-4.1", "messages": json.loads(call["messages"]), **extra}
    if isinstance(call["tools"], str):
        body["tools"] = json.loads(call["tools"])
    return body


@pytest.fixture(scope="module")
def adapter_dir(base_model_dir, tmp_path_factory):
    return untrained_adapter(base_model_dir, tmp_path_factory.mktemp("adapter") / "adapter")


@pytest.fixture(scope="module")
def fallback():
    fake = FakeOpenAI()
    with serving(fake.app()) as url:
        fake.url = url + "/v1"
        yield fake


def intent_route(sample_calls, adapter_dir, base_model_dir, name: str, threshold: float) -> dict:
    return step_route(sample_calls[sample_calls["step"] == "classify_intent"], name, base_model_dir, adapter_dir, threshold)


# The untrained adapter answers as the base model, whose answers to the intent step's first calls
# end within this many tokens (an answer cut at the budget is never served).
BUDGET = 128


def make_registry(folder, routes: list[dict], fake: FakeOpenAI):
    return promoted_registry(folder, routes, fake.url, BUDGET)


@pytest.fixture(scope="module")
def engine():
    return SlmEngine()  # one base model in memory for the whole module


@pytest.fixture
def router(sample_calls, adapter_dir, base_model_dir, fallback, engine, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_FALLBACK_KEY", "fallback-secret")
    registry = make_registry(tmp_path, [intent_route(sample_calls, adapter_dir, base_model_dir, "cluster-2", 0.0)], fallback)
    settings = RouterSettings(registry=registry, landing_dir=tmp_path / "landing", tokens=(TOKEN,),
                              pseudonym_key="test-pseudonym-key", encryption_key=ENCRYPTION_KEY,
                              reload_interval=0.1, slm_timeout=120)
    return Router(settings, engine)


def intent_call(sample_calls, i: int = 0):
    return sample_calls[sample_calls["step"] == "classify_intent"].iloc[i]


def test_a_call_of_a_promoted_route_is_answered_by_its_slm_and_an_unrelated_one_is_forwarded(router, sample_calls, fallback):
    fallback.requests.clear()
    with TestClient(router.app()) as client:
        answered = client.post("/v1/chat/completions", json=request_of(intent_call(sample_calls)), headers=AUTH)
        forwarded = client.post("/v1/chat/completions", json=UNRELATED, headers=AUTH)
    assert answered.status_code == 200, answered.text
    assert answered.headers["x-slm-served-by"] == "slm"
    assert answered.headers["x-slm-route"] == "cluster-2@v0001"
    assert float(answered.headers["x-slm-confidence"]) > 0
    completion = answered.json()
    assert completion["model"] == "slm-router/cluster-2@v0001"
    assert completion["choices"][0]["message"]["content"].strip()
    assert completion["usage"]["prompt_tokens"] > 100  # the intent step's system prompt

    assert forwarded.status_code == 200
    assert forwarded.headers["x-slm-served-by"] == "fallback"
    assert forwarded.headers["x-slm-reason"].startswith("no route: nearest cluster-2")
    assert forwarded.json()["choices"][0]["message"]["content"] == FALLBACK_ANSWER
    # the original request reached the fallback, with the fallback's key, not the router's token
    assert fallback.requests == [UNRELATED]
    assert fallback.authorizations == ["Bearer fallback-secret"]


def test_every_step_of_the_sample_but_the_routed_one_goes_to_the_fallback(router, sample_calls):
    """The match rule admits the route's own step and no other step of the sample."""
    table = RouteTable.load(router.settings.registry)
    for step, calls in sample_calls.groupby("step"):
        calls = calls.sample(min(len(calls), 30), random_state=0)
        admitted = [table.match(m, t, router.embeddings).route is not None for m, t in zip(calls["messages"], calls["tools"])]
        assert (np.mean(admitted) > 0.95) if step == "classify_intent" else not any(admitted), step


def test_a_system_prompt_only_the_routes_cluster_carried_finds_the_route_without_an_embedding(router, sample_calls):
    """The lookup by system prompt is microseconds where the embedding match is milliseconds; a
    prompt that calls of two clusters carried is no key, and their calls are matched by embedding."""
    clusters = sample_calls["step"].map({step: i for i, step in enumerate(sorted(sample_calls["step"].dropna().unique()))})
    keys = exclusive_system_prompts(list(sample_calls["messages"]), list(clusters.fillna(-1)))
    intent_cluster = int(clusters[sample_calls["step"] == "classify_intent"].iloc[0])
    assert len(keys) == 4 and all(len(k) == 1 for k in keys.values())  # one system prompt per step of the sample
    assert exclusive_system_prompts(list(sample_calls["messages"]), [0] * len(sample_calls), min_calls=10**6) == {}
    # one intent call clustered with another step: the intent prompt names no cluster alone any more
    moved = list(clusters)
    moved[int(np.flatnonzero(sample_calls["step"] == "classify_intent")[0])] = intent_cluster + 1
    assert intent_cluster not in exclusive_system_prompts(list(sample_calls["messages"]), moved)
    with TestClient(router.app()):
        table = router.table
        keyed = dataclasses.replace(table.routes[0], system_prompts=frozenset(keys[intent_cluster]))
        lookup = table.__class__(table.version, (keyed,), table.fallback)
        intents = sample_calls[sample_calls["step"] == "classify_intent"].iloc[:50]
        timings = {}
        for name, routes in (("lookup", lookup), ("embedding", table)):
            started = time.perf_counter()
            matches = [routes.match(m, t, router.embeddings) for m, t in zip(intents["messages"], intents["tools"])]
            timings[name] = (time.perf_counter() - started) / len(intents)
            assert all(m.route is not None and m.route.name == "cluster-2" for m in matches)
            assert all(m.by_system_prompt for m in matches) == (name == "lookup")
        other = sample_calls[sample_calls["step"] == "call_tool"].iloc[0]
        assert lookup.match(other["messages"], other["tools"], router.embeddings).route is None
    assert timings["lookup"] < 0.002 and timings["lookup"] < timings["embedding"] / 5, timings


def test_low_confidence_an_slm_failure_and_an_slm_timeout_each_fall_back(router, sample_calls, fallback, monkeypatch):
    body = request_of(intent_call(sample_calls, 1))
    with TestClient(router.app()) as client:
        table = router.table
        strict = table.routes[0].__class__(**{**table.routes[0].__dict__, "threshold": 1.01})
        router.table = table.__class__(table.version, (strict,), table.fallback)
        low = client.post("/v1/chat/completions", json=body, headers=AUTH)
        router.table = table

        def broken(*args):
            raise RuntimeError("adapter weights unreadable")

        with monkeypatch.context() as patch:
            patch.setattr(router.engine, "answer", broken)
            failed = client.post("/v1/chat/completions", json=body, headers=AUTH)
        router.settings.slm_timeout = 0.0
        slow = client.post("/v1/chat/completions", json=body, headers=AUTH)
    for response in (low, failed, slow):
        assert response.status_code == 200
        assert response.headers["x-slm-served-by"] == "fallback"
        assert response.json()["choices"][0]["message"]["content"] == FALLBACK_ANSWER
    assert low.headers["x-slm-reason"].startswith("low confidence:")
    assert failed.headers["x-slm-reason"] == "slm error: RuntimeError"
    assert slow.headers["x-slm-reason"].startswith("slm timeout:")


def test_a_route_trained_without_its_steps_instructions_serves_only_calls_that_carry_them(router, sample_calls):
    """An adapter trained without the system prompt its cluster's calls share gets each call with
    that prompt taken out; a call whose system prompt was reworded goes to the LLM."""
    call = intent_call(sample_calls)
    system = json.loads(call["messages"])[0]["content"]
    reworded = request_of(call)
    reworded["messages"][0]["content"] = "Reworded: " + system
    with TestClient(router.app()) as client:
        table = router.table
        factored = dataclasses.replace(table.routes[0], shared=SharedInstructions(system=system))
        whole = router.engine.answer(table.routes[0], call["messages"], call["tools"], 8, timeout=120)
        without = router.engine.answer(factored, call["messages"], call["tools"], 8, timeout=120)
        router.table = table.__class__(table.version, (factored,), table.fallback)
        changed = client.post("/v1/chat/completions", json=reworded, headers=AUTH)
        carried = client.post("/v1/chat/completions", json=request_of(call), headers=AUTH)
        router.table = table
    assert without.prompt_tokens < whole.prompt_tokens - 150  # the intent step's system prompt is long
    assert changed.headers["x-slm-served-by"] == "fallback"
    assert changed.headers["x-slm-reason"].startswith("instructions changed")
    assert not carried.headers.get("x-slm-reason", "").startswith("instructions changed")


def test_an_in_context_route_answers_with_the_bare_base_model_and_retrieved_examples_beside_an_adapter_route(
        sample_calls, adapter_dir, base_model_dir, fallback, tmp_path, monkeypatch):
    """A tool step promoted as the base SLM with retrieved examples (no adapter) and the intent
    step as a LoRA adapter, on one base model: each answers its own calls, the in-context one as
    a call of the request's own tools, with the solved calls of its bank in the prompt."""
    from pipeline import incontext
    from pipeline.calls import baseline_answer

    monkeypatch.setenv("TEST_FALLBACK_KEY", "fallback-secret")
    tools = sample_calls[sample_calls["step"] == "call_tool"]
    bank, call = tmp_path / "bank", tools.iloc[-1]
    incontext.write_bank(bank, tools.iloc[:-1], [baseline_answer(r) for r in tools.iloc[:-1]["response_message"]],
                         native_tools=False, shots=2, base_model="smollm2-135m-instruct", task="call a tool")
    tool_route = {**step_route(tools, "cluster-0", base_model_dir, bank, 0.0), "kind": "in_context"}
    registry = make_registry(tmp_path, [tool_route, intent_route(sample_calls, adapter_dir, base_model_dir, "cluster-2", 0.0)],
                             fallback)
    assert "served by slm-router itself" in promote.vllm_serving_commands(registry, promote.read_router_config(registry))
    # a fresh engine: the in-context route (first by name) loads the bare base model, the adapter joins it
    settings = RouterSettings(registry=registry, landing_dir=tmp_path / "landing", tokens=(TOKEN,),
                              pseudonym_key="test-pseudonym-key", reload_interval=0.1, slm_timeout=120)
    router = Router(settings, SlmEngine())
    with TestClient(router.app()) as client:
        tool_answer = client.post("/v1/chat/completions", json=request_of(call), headers=AUTH)
        intent_answer = client.post("/v1/chat/completions", json=request_of(intent_call(sample_calls)), headers=AUTH)
    assert tool_answer.headers["x-slm-route"] == "cluster-0@v0001", tool_answer.headers
    assert intent_answer.headers["x-slm-route"] == "cluster-2@v0001"
    table = router.table
    answer = router.engine.answer(table.routes[0], call["messages"], call["tools"], 96, timeout=120)
    # decoded in the bank's format: a call of one of the request's own tools, or the step's recurring text
    texts = structured.read_answer_format(bank)["texts"]
    named = re.match(r'<tool_call>\[\{"name": "([^"]+)"', answer.text)
    assert answer.text in texts or named and named[1] in {t["function"]["name"] for t in json.loads(call["tools"])}, answer
    plain = dataclasses.replace(table.routes[1], shared=SharedInstructions())  # the adapter route, the call whole
    alone = router.engine.answer(dataclasses.replace(plain, max_new_tokens=1), call["messages"], call["tools"], 1,
                                 timeout=120)
    assert answer.prompt_tokens > 2 * alone.prompt_tokens  # two solved calls of the step shown before it


def test_auth_is_enforced_and_bad_requests_get_clear_4xx_errors(router, sample_calls):
    router.settings.max_request_bytes = 20_000
    with TestClient(router.app()) as client:
        assert client.post("/v1/chat/completions", json=UNRELATED).status_code == 401
        wrong = client.post("/v1/chat/completions", json=UNRELATED, headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
        assert client.get("/v1/models").status_code == 401
        assert client.get("/metrics").status_code == 401
        assert client.get("/healthz").json() == {"status": "ok", "router_version": 1, "routes": ["cluster-2@v0001"]}

        not_json = client.post("/v1/chat/completions", content=b"{messages", headers=AUTH)
        assert not_json.status_code == 400 and "not valid JSON" in not_json.json()["error"]["message"]
        no_messages = client.post("/v1/chat/completions", json={"model": "x"}, headers=AUTH)
        assert no_messages.status_code == 400 and no_messages.json()["error"]["param"] == "messages"
        no_role = client.post("/v1/chat/completions", json={"messages": [{"content": "hi"}]}, headers=AUTH)
        assert no_role.status_code == 400 and no_role.json()["error"]["param"] == "messages[0]"
        huge = {"messages": [{"role": "user", "content": "x" * 30_000}]}
        too_big = client.post("/v1/chat/completions", json=huge, headers=AUTH)
        assert too_big.status_code == 413 and "over the limit of 20000 bytes" in too_big.json()["error"]["message"]

        # hostile requests get a 4xx, never a 500 (issue 30)
        not_ascii = client.post("/v1/chat/completions", json=UNRELATED, headers={"authorization": b"Bearer t\xffken"})
        assert not_ascii.status_code == 401
        deep = client.post("/v1/chat/completions", content=b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", headers=AUTH)
        assert deep.status_code == 400 and "not valid JSON" in deep.json()["error"]["message"]
        digits = client.post("/v1/chat/completions", content=b'{"messages": [], "n": ' + b"9" * 5000 + b"}", headers=AUTH)
        assert digits.status_code == 400 and "not valid JSON" in digits.json()["error"]["message"]
        surrogate = client.post("/v1/chat/completions", headers=AUTH,
                                content=b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}')
        assert surrogate.status_code == 400 and "lone surrogate" in surrogate.json()["error"]["message"]
        nested = {"a": "x"}
        for _ in range(150):
            nested = {"a": nested}
        deep_tools = client.post("/v1/chat/completions", headers=AUTH, json={**UNRELATED, "tools": [nested]})
        assert deep_tools.status_code == 400 and "nested deeper than 100 levels" in deep_tools.json()["error"]["message"]

        table = router.table
        router.table = table.__class__(table.version, table.routes,
                                       {**table.fallback, "base_url": "http://user:s3cret-pass@127.0.0.1:9/v1?api-key=k3y"})
        unreachable = client.post("/v1/chat/completions", json=UNRELATED, headers=AUTH)
        router.table = table
        assert unreachable.status_code == 502 and unreachable.json()["error"]["type"] == "fallback_error"
        assert "s3cret-pass" not in unreachable.text and "k3y" not in unreachable.text  # credentials never echoed
        assert "http://127.0.0.1:9/v1" in unreachable.json()["error"]["message"]
        assert unreachable.headers["x-slm-served-by"] == "fallback" and unreachable.headers["x-slm-reason"].startswith("no route")

        models = client.get("/v1/models", headers=AUTH).json()["data"]
        assert [m["id"] for m in models] == ["slm-router/cluster-2@v0001", "gpt-4.1"]


def test_stalled_connections_neither_lock_out_health_checks_nor_clients_and_are_closed(router):
    """8 sockets that send half a request, with 4 requests allowed in flight: /healthz and a whole
    chat request still answer 200, and the stalled sockets are closed after the header deadline."""
    import socket

    router.settings.max_concurrency = 4
    with serving(router.app(), **uvicorn_options(header_seconds=1.0)) as url:
        host, port = url.removeprefix("http://").split(":")
        stalled = []
        for _ in range(8):
            sock = socket.create_connection((host, int(port)))
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
            stalled.append(sock)
        # a slow client that still sends its headers within the deadline is answered
        slow = socket.create_connection((host, int(port)))
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHo")
        time.sleep(0.4)
        slow.sendall(b"st: x\r\nConnection: close\r\n\r\n")
        slow.settimeout(10)
        assert slow.recv(1024).startswith(b"HTTP/1.1 200")
        slow.close()
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.get("/healthz").status_code == 200
            answered = client.post("/v1/chat/completions", json=UNRELATED, headers=AUTH)
            assert answered.status_code == 200 and answered.json()["choices"][0]["message"]["content"] == FALLBACK_ANSWER
        deadline = time.monotonic() + 10
        for sock in stalled:
            sock.settimeout(max(deadline - time.monotonic(), 0.1))
            assert sock.recv(1024) == b""  # closed by the server, not by this test's timeout
            sock.close()


def test_an_upstream_answer_with_a_lone_surrogate_is_relayed_and_logged_escaped_not_a_500(router, fallback, monkeypatch):
    monkeypatch.setattr(fallback, "answer", "ok \ud800")  # the upstream was paid for it: the client gets it
    monkeypatch.setenv(rawzone.ENCRYPTION_KEY_ENV, ENCRYPTION_KEY)
    with TestClient(router.app()) as client:
        relayed = client.post("/v1/chat/completions", json=UNRELATED, headers=AUTH)
        assert relayed.status_code == 200 and relayed.json()["choices"][0]["message"]["content"] == "ok \ud800"
    collected = ingest.read_calls(ingest.find_landing_files(router.settings.landing_dir))
    assert collected.traces.empty and list(collected.quarantine["reason"]) == ["a string holds a lone surrogate (not Unicode text)"]


def test_requests_over_the_in_flight_limit_get_503_at_once(router):
    router.settings.max_concurrency = 0
    with TestClient(router.app()) as client:
        busy = client.post("/v1/chat/completions", json=UNRELATED, headers=AUTH)
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert client.get("/healthz").status_code == 200


def test_streamed_answers_spell_the_same_message_from_the_slm_and_from_the_fallback(router, sample_calls):
    body = request_of(intent_call(sample_calls, 2))
    with TestClient(router.app()) as client:
        whole = client.post("/v1/chat/completions", json=body, headers=AUTH).json()["choices"][0]["message"]
        streams = {}
        for name, request in (("slm", body), ("fallback", UNRELATED)):
            with client.stream("POST", "/v1/chat/completions", json={**request, "stream": True}, headers=AUTH) as response:
                assert response.headers["content-type"].startswith("text/event-stream")
                assert response.headers["x-slm-served-by"] == name, response.headers.get("x-slm-reason")
                spelled = StreamedAnswer()
                for chunk in response.iter_bytes():
                    spelled.feed(chunk)
                streams[name] = spelled
    assert streams["slm"].complete and streams["slm"].message() == {"role": "assistant", "content": whole["content"]}
    assert streams["fallback"].complete and streams["fallback"].message()["content"] == FALLBACK_ANSWER


def test_served_calls_land_sealed_as_canonical_traces_that_ingestion_reads_and_curation_keeps_slm_answers_out(
        router, sample_calls, monkeypatch):
    call = intent_call(sample_calls, 3)
    with TestClient(router.app()) as client:
        slm = client.post("/v1/chat/completions", json={**request_of(call), "user": "alice@example.com"},
                          headers={**AUTH, "x-session-id": "sess-42"})
        llm = client.post("/v1/chat/completions", json={**UNRELATED, "stream": True}, headers={**AUTH, "x-session-id": "sess-42"})
        assert slm.headers["x-slm-served-by"] == "slm" and llm.headers["x-slm-served-by"] == "fallback"
        folder = router.settings.landing_dir / "router"
        writing = list(folder.iterdir())
        assert [f.name.startswith(".") for f in writing] == [True]  # nothing visible until the file is closed
        tokens = writing[0].read_bytes().split(b"\n")[:-1]  # and on disk each call is sealed on its own
        assert len(tokens) == 2 and all(token.startswith(sources.SEALED_MAGIC) for token in tokens)
    files = sorted(folder.iterdir())  # sealed and written at shutdown
    assert [f.name.endswith(".jsonl.enc") for f in files] == [True]
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    sealed = files[0].read_bytes()
    user_text = json.loads(call["messages"])[-1]["content"]
    assert not any(text.encode() in sealed for text in ("sess-42", "alice@example.com", user_text[:30], FALLBACK_ANSWER))

    # collection opens the sealed file with the raw zone's key, and says what is missing without it
    monkeypatch.delenv(rawzone.ENCRYPTION_KEY_ENV, raising=False)
    unreadable = ingest.read_calls(ingest.find_landing_files(router.settings.landing_dir))
    assert unreadable.traces.empty and "is encrypted: set SLM_RAW_ENCRYPTION_KEY" in unreadable.quarantine["reason"].iloc[0]
    monkeypatch.setenv(rawzone.ENCRYPTION_KEY_ENV, ENCRYPTION_KEY)
    calls = ingest.read_calls(ingest.find_landing_files(router.settings.landing_dir)).traces
    assert len(calls) == 2
    by_model = calls.set_index("model")
    slm_row = by_model.loc["slm-router/cluster-2@v0001"]
    assert json.loads(slm_row["response_message"]) == slm.json()["choices"][0]["message"]
    assert json.loads(slm_row["messages"]) == json.loads(call["messages"])
    assert json.loads(by_model.loc["gpt-4.1"]["response_message"])["content"] == FALLBACK_ANSWER
    # who made the calls is kept as a keyed pseudonym only; the session's calls still group
    assert calls["session_id"].nunique() == 1 and calls["session_id"].iloc[0].startswith("anon-")
    # an SLM's own answer never becomes training or evaluation data
    reasons = [curate.unusable_reason(r, f, m) for r, f, m in zip(calls["response_message"], calls["finish_reason"], calls["model"])]
    assert sorted(reasons, key=str) == [None, "answered by the router's SLM, not the LLM"]


def test_without_an_encryption_key_the_trace_log_is_hidden_until_complete(tmp_path):
    writer = TraceWriter(tmp_path, pseudonym_key=None, encryption_key=None, max_records=2)
    record = {"trace_id": "t1", "called_at": "2026-11-23T10:00:00+00:00",
              "messages": [{"role": "user", "content": "hi"}], "response_message": {"role": "assistant", "content": "hello"}}
    writer.write(record)
    folder = tmp_path / "router"
    assert [p.name.startswith(".") for p in folder.iterdir()] == [True]  # collection skips it
    writer.write({**record, "trace_id": "t2"})  # the second call closes the file
    assert [p.name for p in folder.iterdir()] == [writer.written_files[0].name]
    assert list(ingest.read_calls(writer.written_files).traces["trace_id"]) == ["t1", "t2"]


def test_metrics_count_requests_by_path_and_fallback_reason(router, sample_calls):
    with TestClient(router.app()) as client:
        client.post("/v1/chat/completions", json=request_of(intent_call(sample_calls)), headers=AUTH)
        client.post("/v1/chat/completions", json=UNRELATED, headers=AUTH)
        text = client.get("/metrics", headers=AUTH).text
    assert 'slm_router_requests_total{route="cluster-2@v0001",served_by="slm"} 1.0' in text
    assert 'slm_router_requests_total{route="none",served_by="fallback"} 1.0' in text
    assert 'slm_router_fallbacks_total{reason="no route"} 1.0' in text
    assert "slm_router_config_version 1.0" in text
    assert "slm_router_routing_seconds_count 2.0" in text


def test_promotion_and_rollback_take_effect_under_concurrent_requests_without_a_failed_request(
        sample_calls, adapter_dir, base_model_dir, fallback, engine, tmp_path):
    """A new version promoted while requests are in flight is served from the next request on;
    a rollback the same way; no request fails or sees half a config."""
    registry = make_registry(tmp_path, [intent_route(sample_calls, adapter_dir, base_model_dir, "cluster-7", 0.0)], fallback)
    router = Router(RouterSettings(registry=registry, landing_dir=None, tokens=(TOKEN,), reload_interval=0.05,
                                   slm_timeout=120), engine)
    # intent calls the base model answers in a dozen or two tokens: many requests, a quick test
    bodies = [request_of(intent_call(sample_calls, i)) for i in (5, 11, 19, 35)] + [UNRELATED]

    async def load(url: str, rounds: int) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=120) as client:
            async def one(i):
                return await client.post("/v1/chat/completions", json=bodies[i % len(bodies)])
            return [r for batch in range(rounds) for r in await asyncio.gather(*(one(batch * 6 + i) for i in range(6)))]

    with serving(router.app()) as url:
        before = asyncio.run(load(url, 1))
        strict = {**intent_route(sample_calls, adapter_dir, base_model_dir, "cluster-7", 1.01)}

        async def promote_while_loading():
            pending = asyncio.create_task(load(url, 1))
            await asyncio.sleep(0.3)
            await asyncio.to_thread(promote.promote_routes, registry, [(strict, {"max_new_tokens": BUDGET})],
                                    promote.read_router_config(registry)["fallback"], "0002")
            return await pending

        during = asyncio.run(promote_while_loading())
        time.sleep(0.5)  # the watcher looks at router.yaml every 0.05 s
        after = asyncio.run(load(url, 1))
        promote.rollback(registry, "cluster-7")
        time.sleep(0.5)
        rolled_back = asyncio.run(load(url, 1))

    everything = before + during + after + rolled_back
    assert all(r.status_code == 200 for r in everything), [r.text for r in everything if r.status_code != 200]
    routed = lambda responses: {r.headers["x-slm-route"] for r in responses} - {"none"}  # noqa: E731
    assert routed(before) == {"cluster-7@v0001"}
    assert routed(after) == {"cluster-7@v0002"}
    assert all(r.headers["x-slm-served-by"] == "fallback" for r in after)  # v0002's threshold is out of reach
    assert routed(rolled_back) == {"cluster-7@v0001"}
    assert {r.headers["x-slm-served-by"] for r in rolled_back if r.headers["x-slm-route"] != "none"} == {"slm"}
    assert routed(during) <= {"cluster-7@v0001", "cluster-7@v0002"}
    assert max(engine.batch_sizes) > 1  # concurrent requests of the route were answered together


def test_a_router_config_that_cannot_be_served_is_refused_and_a_bad_reload_keeps_the_old_one(router, tmp_path):
    with pytest.raises(RouterConfigError, match="does not exist: run `slm-convert run`"):
        RouteTable.load(tmp_path / "empty")
    assert router.reload() and router.table.version == 1
    config = router.settings.registry / promote.ROUTER_CONFIG
    broken = config.read_text().replace("adapter: cluster-2/v0001/adapter", "adapter: cluster-2/v0009/adapter")
    config.write_text(broken)
    assert not router.reload()
    assert router.table.version == 1 and router.table.routes[0].key == "cluster-2@v0001"
    assert router.metrics.reloads.labels("failed")._value.get() == 1


def test_a_route_whose_adapter_leads_outside_the_registry_or_whose_files_changed_is_not_served(router, tmp_path):
    registry = router.settings.registry
    config = (registry / promote.ROUTER_CONFIG).read_text()
    elsewhere = shutil.copytree(registry / "cluster-2" / "v0001", tmp_path / "elsewhere" / "v0001")
    for adapter in (str(elsewhere / "adapter"), "cluster-2/../../elsewhere/v0001/adapter", "../elsewhere/v0001/adapter"):
        (registry / promote.ROUTER_CONFIG).write_text(config.replace("adapter: cluster-2/v0001/adapter", f"adapter: {adapter}"))
        with pytest.raises(RouterConfigError, match="is not <route>/<version>/adapter inside the registry"):
            RouteTable.load(registry)
    (registry / promote.ROUTER_CONFIG).write_text(config)
    (registry / "cluster-2" / "link").symlink_to(tmp_path / "elsewhere" / "v0001")
    (registry / promote.ROUTER_CONFIG).write_text(config.replace("adapter: cluster-2/v0001/adapter", "adapter: cluster-2/link/adapter"))
    with pytest.raises(RouterConfigError, match="leads outside the registry"):
        RouteTable.load(registry)
    (registry / promote.ROUTER_CONFIG).write_text(config)
    (registry / "cluster-2" / "link").unlink()
    assert RouteTable.load(registry).routes[0].key == "cluster-2@v0001"
    weights = registry / "cluster-2" / "v0001" / "adapter" / "adapter_config.json"
    weights.write_text(weights.read_text().replace('"r":', '"r" :'))  # a byte changed after promotion
    with pytest.raises(RouterConfigError, match=r"files differ from hashes.json \(adapter/adapter_config.json\)"):
        RouteTable.load(registry)


def test_answers_become_openai_messages_and_a_garbled_tool_call_is_not_served():
    message, finish = answer_to_message('<tool_call>[{"name": "get_weather", "arguments": {"city": "Oslo"}}]</tool_call>')
    assert finish == "tool_calls" and message["content"] is None
    assert message["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    assert answer_to_message("booking, cancel") == ({"role": "assistant", "content": "booking, cancel"}, "stop")
    assert answer_to_message('<tool_call>[{"name": "get_weather", "argu') == (None, "garbled tool call")

    spelled = StreamedAnswer()
    for event in [{"choices": [{"delta": {"role": "assistant", "content": None}}]},
                  {"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "f", "arguments": '{"a"'}}]}}]},
                  {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}}]},
                  {"choices": [{"delta": {}, "finish_reason": "tool_calls"}]}]:
        spelled.feed(f"data: {json.dumps(event)}\n\n".encode())
    spelled.feed(b"data: [DONE]\n\n")
    assert spelled.message() == {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "id": "call_1", "function": {"name": "f", "arguments": '{"a": 1}'}}]}


def test_the_command_refuses_to_start_without_tokens_or_a_router_config(tmp_path, monkeypatch):
    from pipeline.router_service import main

    monkeypatch.delenv("SLM_ROUTER_TOKENS", raising=False)
    with pytest.raises(SystemExit, match="set SLM_ROUTER_TOKENS"):
        main(["--registry", str(tmp_path)])
    with pytest.raises(SystemExit, match="--no-auth is for loopback only"):
        main(["--registry", str(tmp_path), "--no-auth", "--host", "0.0.0.0"])
    monkeypatch.setenv("SLM_ROUTER_TOKENS", "a, b")
    with pytest.raises(SystemExit, match=f"no router.yaml in {tmp_path}; run `slm-convert run` first"):
        main(["--registry", str(tmp_path)])
    promote.write_router_config(tmp_path, [], {"model": "gpt-4.1", "base_url": "http://127.0.0.1:9/v1"})
    monkeypatch.delenv(rawzone.ENCRYPTION_KEY_ENV, raising=False)
    with pytest.raises(SystemExit, match="set SLM_RAW_ENCRYPTION_KEY .* so that the trace log is sealed"):
        main(["--registry", str(tmp_path)])
