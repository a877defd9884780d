"""The OpenAI-compatible HTTP API on uvicorn (no Ray): endpoints, SSE format, auth, limits, errors,
disconnects, metrics, and >= 2,000 generated requests checked against the OpenAPI contract (schemathesis)."""

from __future__ import annotations

import json
import os
import re
import secrets
import time

import httpx
import pytest
import torch

from services.api.app import build_state, create_app
from services.testing import ServerThread, tiny_model_dir

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
KEY_ENV = "HERD_TEST_SERVE_API_KEY"  # this module's servers read their key from here
os.environ[KEY_ENV] = KEY


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    before = torch.get_num_threads()
    model_dir = tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")
    state = build_state(
        {
            "model": str(model_dir),
            "served_model_name": "herd-tiny",
            "num_threads": 1,
            "default_max_tokens": 16,
            "request_timeout_s": 30,
            "api_key_env": KEY_ENV,
            "engine": {"max_num_seqs": 4, "max_model_len": 256, "max_queue": 4},
        }
    )
    with ServerThread(create_app(state)) as srv:
        srv.state = state
        yield srv
    state.engine.shutdown()
    torch.set_num_threads(before)


def client(server, **kw):
    return httpx.Client(base_url=server.url, timeout=60, **kw)


def metric(server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", headers=AUTH).text
    m = re.search(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M)
    assert m, name
    return float(m.group(1))


def sse_events(resp) -> list:
    events = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            data = line[6:]
            events.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", line
    return events


# --- endpoints ---------------------------------------------------------------------------------


def test_models_health_and_page(server):
    with client(server, headers=AUTH) as c:
        models = c.get("/v1/models").json()
        assert models["object"] == "list" and models["data"][0]["id"] == "herd-tiny"
        assert c.get("/v1/models/herd-tiny").json()["id"] == "herd-tiny"
        assert c.get("/v1/models/other").status_code == 404
        assert c.get("/health").json() == {"status": "ok"}  # nothing more: no model, no internals
        page = c.get("/")
        assert page.status_code == 200 and "v1/chat/completions" in page.text


def test_auth_missing_or_wrong_key_gets_401(server):
    with client(server) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            for method, path, body in [
                ("GET", "/v1/models", None),
                ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2}),
                ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
            ]:
                r = c.request(method, path, json=body, headers=headers)
                assert r.status_code == 401, (headers, path)
                err = r.json()["error"]
                assert err["code"] in ("missing_api_key", "invalid_api_key") and err["message"]
        # every route but /health, the schema, docs, metrics and the page included
        for path in ("/", "/docs", "/redoc", "/openapi.json", "/metrics", "/v1/models/herd-tiny", "/nowhere"):
            r = c.get(path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key", path
        assert c.get("/health").status_code == 200  # probes need no key
        server.state.config.public_metrics = True  # a scraper inside the cluster, by choice
        try:
            assert c.get("/metrics").status_code == 200 and c.get("/v1/models").status_code == 401
        finally:
            server.state.config.public_metrics = False


def test_unknown_model_is_404(server):
    with client(server, headers=AUTH) as c:
        for path, body in [
            ("/v1/completions", {"prompt": "hi"}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ]:
            r = c.post(path, json={**body, "model": "gpt-4-not-served", "max_tokens": 2})
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
            assert c.post(path, json={**body, "model": "herd-tiny", "max_tokens": 2}).status_code == 200


def test_empty_key_refuses_to_start(tmp_path):
    from model.errors import HerdError
    from services.config import load_server_config

    config = load_server_config({"model": "smollm2", "api_key_env": "HERD_TEST_NO_SUCH_KEY"})
    with pytest.raises(HerdError, match="no API key: HERD_TEST_NO_SUCH_KEY is empty or unset") as e:
        config.api_key({"HERD_TEST_NO_SUCH_KEY": "  "})
    assert "\n" not in str(e.value)
    assert load_server_config({"model": "smollm2", "auth": "none"}).api_key({}) is None


def test_completion_non_streaming_and_streaming(server):
    with client(server, headers=AUTH) as c:
        r = c.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 7, "temperature": 0})
        body = r.json()
        assert r.status_code == 200 and body["object"] == "text_completion"
        choice = body["choices"][0]
        assert body["usage"]["completion_tokens"] <= 7 and choice["finish_reason"] in ("stop", "length")
        with c.stream(
            "POST",
            "/v1/completions",
            json={
                "prompt": "Once upon a time",
                "max_tokens": 7,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        ) as s:
            assert s.headers["content-type"].startswith("text/event-stream")
            events = sse_events(s)
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        assert chunks[-1]["usage"]["completion_tokens"] == body["usage"]["completion_tokens"]
        assert "".join(e["choices"][0]["text"] for e in chunks if e["choices"]) == choice["text"]
        assert [e["choices"][0]["finish_reason"] for e in chunks if e["choices"]][-1] == choice["finish_reason"]
        # token-id prompts and several prompts
        for prompt in ([[1, 2, 3], [4, 5]], ["hello", "world"]):
            r = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 3})
            assert [ch["index"] for ch in r.json()["choices"]] == [0, 1]


def test_chat_non_streaming_and_streaming(server):
    with client(server, headers=AUTH) as c:
        req = {
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}],
            "max_tokens": 6,
            "temperature": 0,
        }
        body = c.post("/v1/chat/completions", json=req).json()
        assert body["object"] == "chat.completion"
        msg = body["choices"][0]["message"]
        assert msg["role"] == "assistant"
        with c.stream("POST", "/v1/chat/completions", json={**req, "stream": True}) as s:
            events = sse_events(s)
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        assert all(e["object"] == "chat.completion.chunk" for e in chunks)
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert chunks[-1]["choices"][0]["finish_reason"] == body["choices"][0]["finish_reason"]
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in chunks) == msg["content"]


def test_logprobs_penalties_and_cache_salt(server):
    """Log-probabilities in both APIs' shapes, equal to the model's own log-softmax; sampling settings
    of the batched sampler are taken; a salted request shares no prefix-cache blocks."""
    engine = server.state.engine.engine
    with client(server, headers=AUTH) as c:
        body = c.post(
            "/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0, "logprobs": 2}
        ).json()
        lp = body["choices"][0]["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 4
        assert all(
            len(top) <= 2 and max(top.values()) == pytest.approx(chosen, abs=1e-4)
            for top, chosen in zip(lp["top_logprobs"], lp["token_logprobs"])
        )  # greedy: the top token
        ids = [5, 6, 7] + [engine.tokenizer.encode(t)[0] for t in lp["tokens"][:1]]
        with torch.inference_mode():
            ref = engine.runner.model(torch.tensor([[5, 6, 7]]))[0, -1].float().log_softmax(-1)
        assert lp["token_logprobs"][0] == pytest.approx(float(ref.max()), abs=1e-3) and len(ids) == 4
        chat = c.post(
            "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 3,
                "logprobs": True,
                "top_logprobs": 3,
                "temperature": 0.8,
                "top_p": 0.9,
                "min_p": 0.05,
                "presence_penalty": 1.0,
                "frequency_penalty": 0.5,
                "repetition_penalty": 1.2,
                "seed": 1,
            },
        ).json()
        content = chat["choices"][0]["logprobs"]["content"]
        assert len(content) == chat["usage"]["completion_tokens"] and all(len(t["top_logprobs"]) == 3 for t in content)
        assert "".join(t["token"] for t in content) == chat["choices"][0]["message"]["content"]
        prompt = "a shared tenant prompt " * 6
        before = engine.scheduler.cached_tokens
        for salt in ("tenant-a", "tenant-b"):
            c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1, "cache_salt": salt})
        assert engine.scheduler.cached_tokens == before
        c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1, "cache_salt": "tenant-a"})
        assert engine.scheduler.cached_tokens > before


# --- limits and errors -------------------------------------------------------------------------


def test_context_overflow_is_400_with_openai_error(server):
    with client(server, headers=AUTH) as c:
        r = c.post("/v1/completions", json={"prompt": "word " * 100, "max_tokens": 200})
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["code"] == "context_length_exceeded" and "maximum context length is 256" in err["message"]
        assert err["type"] == "invalid_request_error"
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x " * 400}]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "hi", "max_tokens": 0},
        {"prompt": "hi", "temperature": -1},
        {"prompt": "hi", "top_p": 0},
        {"prompt": "hi", "n": 2},
        {"prompt": 5},
        {"max_tokens": 3},
        {"prompt": [-1]},
        {"prompt": [10**9]},
        {"prompt": []},
        {"prompt": "hi", "logprobs": 21},
        {"prompt": "hi", "stop": 3},
        {"prompt": "hi", "min_p": 1.5},
        {"prompt": "hi", "repetition_penalty": 0},
        {"prompt": "hi", "cache_salt": ""},
    ],
)
def test_invalid_completion_bodies_are_400(server, body):
    r = httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH)
    assert r.status_code == 400, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_malformed_json_is_400(server):
    for data, ctype in [
        (b"{not json", "application/json"),
        (b"\xff\xfe", "application/json"),
        (b"prompt=hi", "application/x-www-form-urlencoded"),
        (b"[]", "application/json"),
    ]:
        r = httpx.post(f"{server.url}/v1/chat/completions", content=data, headers={**AUTH, "content-type": ctype})
        assert r.status_code == 400, (data, r.status_code, r.text)
        assert "error" in r.json()


def test_full_queue_is_503_and_timeouts_are_408(server):
    state = server.state
    streams = []
    with client(server, headers=AUTH) as c:
        try:
            # 4 slots + 4 queue places: fill them with long requests, then one more is refused.
            for _ in range(8):
                s = c.stream("POST", "/v1/completions", json={"prompt": "a", "max_tokens": 200, "stream": True})
                streams.append(s)
                s.__enter__()
            r = c.post("/v1/completions", json={"prompt": "b", "max_tokens": 2})
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "server_overloaded" and r.headers["retry-after"] == "1"
            # More prompts in one request than the server ever holds is the client's error, not a retry.
            r = c.post("/v1/completions", json={"prompt": ["b"] * 9, "max_tokens": 2})
            assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
        finally:
            for s in streams:
                s.__exit__(None, None, None)
        deadline = time.monotonic() + 30
        while metric(server, "herd_num_requests_running") + metric(server, "herd_num_requests_waiting"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        old = state.config.request_timeout_s
        state.config.request_timeout_s = 0.05
        try:
            r = c.post("/v1/completions", json={"prompt": "a", "max_tokens": 200})
        finally:
            state.config.request_timeout_s = old
        assert r.status_code == 408 and r.json()["error"]["type"] == "timeout"


def test_disconnect_mid_stream_frees_the_slot(server):
    aborted = metric(server, "herd_request_aborted_total")
    with client(server, headers=AUTH) as c:
        with c.stream("POST", "/v1/completions", json={"prompt": "tell", "max_tokens": 240, "stream": True}) as s:
            lines = s.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert got[0].startswith("data: ")
            assert metric(server, "herd_kv_cache_slots_used") == 1
            assert metric(server, "herd_kv_cache_usage_ratio") > 0
    # The client is gone: the slot is free long before 240 tokens could have been generated.
    deadline = time.monotonic() + 10
    while metric(server, "herd_kv_cache_slots_used") != 0 or metric(server, "herd_num_requests_running") != 0:
        assert time.monotonic() < deadline, "slot not freed after disconnect"
        time.sleep(0.05)
    assert metric(server, "herd_request_aborted_total") == aborted + 1
    assert metric(server, "herd_kv_cache_usage_ratio") == 0


def test_metrics_are_prometheus_text(server):
    text = httpx.get(f"{server.url}/metrics", headers=AUTH).text
    for name in (
        "herd_time_to_first_token_seconds_bucket",
        "herd_inter_token_latency_seconds_count",
        "herd_e2e_request_latency_seconds_sum",
        "herd_num_requests_waiting",
        "herd_num_requests_running",
        "herd_kv_cache_usage_ratio",
        "herd_prefix_cache_hit_rate",
    ):
        assert re.search(rf"^{name}{{", text, re.M), name
    assert "# TYPE herd_time_to_first_token_seconds histogram" in text
    assert metric(server, "herd_time_to_first_token_seconds_count") > 0


def test_prefix_cache_hit_rate_rises_with_a_shared_system_prompt(server):
    system = "You are a helpful assistant. " * 8
    with client(server, headers=AUTH) as c:
        before = metric(server, "herd_prefix_cache_hits_total")
        for q in ("one", "two", "three"):
            c.post(
                "/v1/chat/completions",
                json={
                    "messages": [{"role": "system", "content": system}, {"role": "user", "content": q}],
                    "max_tokens": 2,
                },
            )
    assert metric(server, "herd_prefix_cache_hits_total") - before >= 2 * 48


# --- generated malformed / boundary requests ---------------------------------------------------


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    """A short context (64 tokens) keeps generated requests quick: most long ones are refused with 400."""
    before = torch.get_num_threads()
    model_dir = tiny_model_dir(tmp_path_factory.mktemp("tiny2") / "model")
    state = build_state(
        {
            "model": str(model_dir),
            "num_threads": 1,
            "request_timeout_s": 60,
            "api_key_env": KEY_ENV,
            "engine": {"max_num_seqs": 4, "max_model_len": 64, "max_queue": 4},
        }
    )
    with ServerThread(create_app(state)) as srv:
        yield srv
    state.engine.shutdown()
    torch.set_num_threads(before)


# Why a schema-valid request may still get 400: (code, param) of what a schema cannot say.
SEMANTIC_400 = {
    ("context_length_exceeded", "prompt"),
    ("context_length_exceeded", "max_tokens"),
    ("context_length_exceeded", "messages"),
    ("invalid_value", "prompt"),
    ("invalid_value", "stop"),
}


# (METHOD, path) -> a validator of the operation's JSON body, filled from the served OpenAPI document.
BODY_SCHEMAS: dict = {}


def body_validators(openapi: dict) -> dict:
    """A JSON Schema validator per operation's request body, the document's components in scope."""
    import jsonschema

    out = {}
    for path, ops in openapi["paths"].items():
        for method, op in ops.items():
            body = (op.get("requestBody") or {}).get("content", {}).get("application/json", {}).get("schema")
            if body:
                doc = {**body, "components": openapi.get("components", {})}
                out[(method.upper(), path)] = jsonschema.Draft202012Validator(doc)
    return out


def semantic_400(ctx, response, case):
    """A schema-valid request refused with 400 names one of the reasons no schema can express:
    the prompt and max_tokens past the context, token ids past the vocabulary, more prompts than the
    server holds, stop strings past their total length."""
    import schemathesis

    if case.meta is None or case.meta.generation.mode != schemathesis.GenerationMode.POSITIVE:
        return None
    # Schemathesis's positive mode has drawn a body outside the schema (a seed below its int64
    # minimum): the schema itself decides what is schema-valid, and refusing anything else is right.
    validator = BODY_SCHEMAS.get((case.method.upper(), case.operation.path))
    if validator is not None and not validator.is_valid(case.body):
        return None
    if response.status_code == 400:
        error = response.json()["error"]
        assert (error["code"], error["param"]) in SEMANTIC_400, f"schema-valid request refused: {error}"
    return None


def test_schemathesis_checks_the_contract(small_server):
    """Generated requests, valid and malformed, with and without the key, each answer checked by every
    one of schemathesis's built-in checks (status code, content type, headers and body against the
    OpenAPI schema, malformed data rejected, auth not ignored, no 5xx, ...). A new seed each run,
    printed: HERD_FUZZ_SEED=<seed> replays it."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, seed, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import CHECKS, load_all_checks
    from schemathesis.config import SchemathesisConfig
    from schemathesis.core.failures import FailureGroup

    server = small_server
    load_all_checks()
    checks = CHECKS.get_all() + [semantic_400]
    run_seed = int(os.environ.get("HERD_FUZZ_SEED") or secrets.randbits(32))
    print(
        f"schemathesis seed {run_seed} (HERD_FUZZ_SEED={run_seed} replays it); checks: "
        f"{', '.join(c.__name__ for c in checks)}",
        flush=True,
    )
    # A schema-valid request may still be refused with 400 for what a schema cannot say (prompt plus
    # max_tokens past the context, token ids past the vocabulary): `semantic_400` checks those codes.
    config = SchemathesisConfig.from_dict(
        {"checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "400", "401", "404", "408", "503"]}}}
    )
    openapi = httpx.get(f"{server.url}/openapi.json", headers=AUTH).json()
    BODY_SCHEMAS.update(body_validators(openapi))
    schema = schemathesis.openapi.from_dict(openapi, config=config)
    counts: dict = {}
    failures = []

    def run(strategy, n, headers):
        @seed(run_seed)
        @settings(
            max_examples=n,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy)
        def test(case):
            try:
                response = case.call_and_validate(base_url=server.url, headers=headers, checks=checks, timeout=60)
            except FailureGroup as e:  # collected: every distinct failure is reported, replayed by the seed
                failures.append(f"{case.method} {case.path} {case.body!r:.200}: {e}"[:1500])
                return
            key = (bool(headers), case.meta.generation.mode.value, response.status_code)
            counts[key] = counts.get(key, 0) + 1

        test()

    # Mostly malformed (negative) cases: valid ones generate tokens, which is slower.
    plan = [(AUTH, "positive", 80), (AUTH, "negative", 240), ({}, "positive", 40), ({}, "negative", 80)]
    for result in schema.get_all_operations():
        op = result.ok()
        for headers, mode, n in plan:
            try:
                run(op.as_strategy(generation_mode=schemathesis.GenerationMode(mode)), n, headers)
            except Unsatisfiable:  # no way to break an operation without inputs (GET /v1/models)
                pass
    total = sum(counts.values()) + len(failures)
    print(
        f"schemathesis: {total} cases, {len(failures)} failures; by (with key, mode, status): {sorted(counts.items())}"
    )
    for f in failures[:10]:
        print("FAILURE", f)
    assert total >= 2000
    assert {k[0] for k in counts} == {True, False}
    assert failures == [], f"{len(failures)} failures (seed {run_seed}); first: {failures[0]}"
