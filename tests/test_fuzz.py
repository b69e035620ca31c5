"""Fuzz every route with generated request bodies against a real server on 127.0.0.1.

Each case is a valid body, a valid body with a few fields broken (wrong types, huge or negative numbers, NaN,
junk nesting, lone surrogates, bad keep_alive strings...), arbitrary JSON, or raw bytes. Whatever comes in:
no 5xx, every error is JSON in its dialect's shape, every stream ends with its final or error frame, and the
server still serves afterwards with nothing left in flight. Generation stays cheap because the models are tiny
and their configured context_length caps every sequence, whatever num_predict / max_tokens the case asks for.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import httpx
import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_server.api.openapi import ROUTES as DOCUMENTED
from mlx_server.api.openapi import request_schema
from support.serving import Server, make_config, serve
from support.tinyrerankers import build_tiny_cross_encoder

MAX_BODY = 64 * 1024  # small, so the 413 path is reachable with cheap bodies
CONTEXT = 32  # tokens: every sequence (prompt + answer) fits in this, so no case can generate for long
MODELS = ["llama-tiny", "qwen-tiny", "tiny-alias", "llama-tiny:latest"]
RERANKER = "rr-tiny"  # a tiny BERT cross-encoder: the rerank routes' valid cases (any other model is a 400 there)
RERANK = ["/v1/rerank", "/rerank", "/v2/rerank", "/api/rerank"]


def fuzz_settings(n: int) -> Callable[[Any], Any]:
    # No example database (nothing written into the tree); no deadline (a case may wait on a model load).
    return settings(max_examples=n, deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def server(tiny_llama: Path, tiny_qwen2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("fuzz")
    config = make_config(tmp, {
        # num_predict 4 is the default for Ollama cases whose options were dropped or broken
        "llama-tiny": {"source": str(tiny_llama), "context_length": CONTEXT, "aliases": ["tiny-alias"],
                       "options": {"num_predict": 4}},
        "qwen-tiny": {"source": str(tiny_qwen2), "context_length": CONTEXT, "options": {"num_predict": 4}},
        RERANKER: {"source": str(build_tiny_cross_encoder(tmp / "reranker", seed=4)), "aliases": ["rr-alias"]}},
        max_body_bytes=MAX_BODY, max_queue=64)
    with serve(config) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


# ---- strategies ----------------------------------------------------------------------------------------------

TRICKY_TEXT = ["", " ", "\x00", "\ud800", "a\udfffb", "<|im_end|>", "<|eot_id|>", "<think>", "</tool_call>",
               "{{ .Prompt }}", "{% raw %}", "日本語テキスト", "🙂" * 8, "\u202e\u200b", "a" * 300]
text = st.one_of(st.text(max_size=24), st.sampled_from(TRICKY_TEXT))
short = st.text(min_size=1, max_size=16)  # prompts of valid cases: a few tokens, never empty
scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), text)
junk = st.recursive(scalar, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                    st.dictionaries(text, inner, max_size=4)), max_leaves=10)
huge = st.sampled_from([2**31, 2**53 + 1, 2**63, 2**64, 2**70, -2**63, -1, 0, 1e308, -1e308,
                        float("inf"), float("-inf"), float("nan"), 0.5, -0.0])
keep_alive = st.sampled_from(["5m", "1h30m", 300, -1, "-1", "10s", "abc", "5x", "1e400", "", "ms", "--5m",
                              "5m5", [], {}, True, 1e400, float("nan"), "0.5h", "300"])
model = st.one_of(st.sampled_from(MODELS), st.sampled_from(["", "nope", "LLAMA-TINY", "qwen-tiny:7b", " "]), text)
role = st.sampled_from(["user", "system", "assistant"])
# mlx_lm compiles its top_p / min_p filters with the value as a constant, so every distinct value costs a
# 1-4 s compile on the CPU backend (see docs/reliability.md): valid cases use a few values only.
TOP_P = st.sampled_from([0.9, 1.0, 0.5])
MIN_P = st.sampled_from([0.0, 0.05])
priority = st.sampled_from([None, "high", "LOW", "medium", "urgent", "", "hIgH", "0"])


def ollama_options() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({"num_predict": st.integers(1, 4)}, optional={
        "temperature": st.floats(0, 2), "top_p": TOP_P, "top_k": st.integers(0, 50),
        "seed": st.integers(0, 2**31), "repeat_penalty": st.floats(0.5, 2), "stop": st.lists(short, max_size=2),
        "num_ctx": st.integers(8, 4096), "min_p": MIN_P})


def valid_body(path: str) -> st.SearchStrategy[dict[str, Any]]:
    """Well-formed requests the server must answer with 200 (small caps, tiny models)."""
    name = st.sampled_from(MODELS)
    stream = st.booleans()
    messages = st.lists(st.fixed_dictionaries({"role": role, "content": short}), min_size=1, max_size=3)
    if path == "/api/generate":
        return st.fixed_dictionaries({"model": name, "prompt": short, "stream": stream, "options": ollama_options()},
                                     optional={"system": short, "raw": st.booleans(), "keep_alive": st.just("5m")})
    if path == "/api/chat":
        return st.fixed_dictionaries({"model": name, "messages": messages, "stream": stream,
                                      "options": ollama_options()}, optional={"keep_alive": st.just(600)})
    if path == "/v1/chat/completions":
        return st.fixed_dictionaries({"model": name, "messages": messages, "max_tokens": st.integers(1, 4),
                                      "stream": stream}, optional={
            "temperature": st.floats(0, 2), "top_p": TOP_P, "seed": st.integers(0, 2**31),
            "stop": st.one_of(short, st.lists(short, max_size=2)), "stream_options": st.just({"include_usage": True}),
            "presence_penalty": st.floats(-2, 2)})
    if path == "/v1/completions":
        return st.fixed_dictionaries({"model": name, "prompt": short, "max_tokens": st.integers(1, 4),
                                      "stream": stream}, optional={"echo": st.booleans(), "logprobs": st.integers(0, 5),
                                                                   "temperature": st.floats(0, 2)})
    user = st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": st.one_of(
        short, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": short}), min_size=1, max_size=2))}),
        min_size=1, max_size=2)
    if path == "/v1/messages":
        return st.fixed_dictionaries({"model": name, "max_tokens": st.integers(1, 4), "messages": user,
                                      "stream": stream}, optional={"system": short, "temperature": st.floats(0, 1),
                                                                   "stop_sequences": st.lists(short, max_size=2)})
    if path == "/v1/responses":
        items = st.lists(st.fixed_dictionaries({"type": st.just("message"), "role": role, "content": st.one_of(
            short, st.lists(st.fixed_dictionaries({"type": st.just("input_text"), "text": short}), min_size=1,
                            max_size=2))}), min_size=1, max_size=3)
        return st.fixed_dictionaries({"model": name, "input": st.one_of(short, items), "max_output_tokens":
                                      st.integers(1, 4), "stream": stream}, optional={
            "instructions": short, "temperature": st.floats(0, 2), "top_p": TOP_P, "store": st.booleans(),
            "truncation": st.just("auto")})
    if path == "/v1/messages/count_tokens":
        return st.fixed_dictionaries({"model": name, "messages": user}, optional={"system": short})
    if path in ("/api/show", "/api/pull"):
        return st.fixed_dictionaries({"model": name}, optional={"stream": st.booleans()})
    if path in RERANK:
        document = st.one_of(short, st.builds(lambda t: {"text": t}, short))
        return st.fixed_dictionaries({"model": st.sampled_from([RERANKER, "rr-alias"]), "query": short,
                                      "documents": st.lists(document, max_size=4)}, optional={
            "top_n": st.integers(0, 5), "return_documents": st.booleans(), "keep_alive": st.just("5m")})
    raise AssertionError(path)


# Field-specific bad values: what a confused client or an attacker would plausibly send for that key.
NASTY: dict[str, st.SearchStrategy[Any]] = {
    "options": st.one_of(junk, st.dictionaries(st.sampled_from(
        ["num_predict", "temperature", "top_k", "top_p", "seed", "stop", "num_ctx", "repeat_penalty",
         "repeat_last_n", "min_p", "mirostat", "use_mmap"]), st.one_of(huge, junk), max_size=4)),
    "max_tokens": st.one_of(huge, junk), "temperature": st.one_of(huge, junk), "seed": huge,
    "keep_alive": keep_alive, "stream": st.one_of(junk, st.sampled_from(["true", 1, 0])),
    "messages": st.one_of(junk, st.lists(st.dictionaries(st.sampled_from(
        ["role", "content", "tool_calls", "images", "name", "tool_call_id", "thinking"]), junk, max_size=3),
        max_size=3), st.lists(st.fixed_dictionaries({"role": st.one_of(role, text), "content": st.one_of(text, junk)}),
                              max_size=3)),
    "format": st.one_of(junk, st.sampled_from(["json", {"type": "object"}, {"type": "nonsense"},
                                               {"$ref": "#/nowhere"}, {"type": "string", "pattern": "(("}])),
    "tools": st.one_of(junk, st.just([{"type": "function", "function": {"name": 1}}])),
    "tool_choice": st.one_of(junk, st.sampled_from(["required", "none", {"type": "any"}])),
    "response_format": st.one_of(junk, st.sampled_from([{"type": "json_object"}, {"type": "json_schema"},
                                                        {"type": "json_schema", "json_schema": {"schema": 5}}])),
    "think": st.one_of(junk, st.sampled_from(["high", "extreme"])), "n": huge, "top_logprobs": huge,
    "logprobs": st.one_of(huge, junk), "stop": st.one_of(junk, st.lists(text)), "num_ctx": huge,
    "template": st.one_of(junk, st.sampled_from(["{{ .Prompt", "{{ .Nope }}", "{{ range .Messages }}", "{{ end }}",
                                                 "{{ if }}{{ end }}", "{{ .System }}{{ .Prompt }}", "{{{{"])),
    "raw": st.one_of(junk, st.booleans()), "shift": st.one_of(junk, st.booleans()), "images": junk, "suffix": st.one_of(junk, text), "echo": junk,
    "system": st.one_of(junk, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}))),
    "thinking": st.one_of(junk, st.sampled_from([{"type": "enabled", "budget_tokens": 2}, {"type": "disabled"}])),
    "output_config": st.one_of(junk, st.just({"format": {"type": "json_schema", "schema": {"type": "object"}}})),
    "stream_options": junk, "prompt": st.one_of(junk, st.lists(text, max_size=3)), "category": junk,
    "stop_sequences": st.one_of(junk, st.lists(text)), "top_k": huge, "top_p": huge,
}


@st.composite
def broken_body(draw: st.DrawFn, path: str) -> Any:
    """A valid body with one to three fields removed, replaced or added."""
    body = dict(draw(valid_body(path)))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["drop", "junk", "nasty", "nasty", "model", "extra"]))
        key = draw(st.sampled_from(sorted(body) or ["model"]))
        if op == "drop":
            body.pop(key, None)
        elif op == "junk":
            body[key] = draw(junk)
        elif op == "nasty":
            key = draw(st.sampled_from(sorted(NASTY)))
            body[key] = draw(NASTY[key])
        elif op == "model":
            body["model"] = draw(st.one_of(model, junk))
        else:
            body[draw(text)] = draw(junk)
    return body


def body_for(path: str) -> st.SearchStrategy[tuple[str, Any]]:
    return st.one_of(valid_body(path).map(lambda b: ("valid", b)), broken_body(path).map(lambda b: ("broken", b)),
                     broken_body(path).map(lambda b: ("broken", b)), junk.map(lambda b: ("junk", b)))


# ---- checks --------------------------------------------------------------------------------------------------


def dialect(path: str) -> str:
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return "anthropic"
    if path in ("/rerank", "/v2/rerank"):  # no dialect's paths: they answer errors as OpenAI does
        return "openai"
    return "openai" if path.startswith("/v1/") else "ollama"


def check_error(path: str, status: int, raw: bytes) -> None:
    body = json.loads(raw)  # must be JSON at all
    kind = dialect(path)
    if kind == "ollama":
        assert isinstance(body.get("error"), str) and body["error"], body
    elif kind == "openai":
        err = body.get("error")
        assert isinstance(err, dict) and isinstance(err.get("message"), str) and isinstance(err.get("type"), str), body
    else:
        err = body.get("error")
        assert body.get("type") == "error" and isinstance(err, dict), body
        assert isinstance(err.get("type"), str) and isinstance(err.get("message"), str), body


def check_stream(path: str, content_type: str, raw: bytes) -> None:
    """A stream must end in its dialect's final frame or in one error frame: anything else is a lost request."""
    text_ = raw.decode()
    if "ndjson" in content_type:
        lines = [json.loads(x) for x in text_.splitlines() if x.strip()]
        assert lines, "empty NDJSON stream"
        last = lines[-1]
        assert last.get("done") is True or "error" in last or last.get("status") == "success", last
        assert all("error" not in x and x.get("done") is not True for x in lines[:-1]), lines
        if "error" in last:
            check_error(path, 400, json.dumps(last).encode())
        return
    assert "event-stream" in content_type, content_type
    events: list[tuple[str, str]] = []
    for block in text_.replace("\r\n", "\n").split("\n\n"):
        name, data = "message", []
        for ln in block.split("\n"):
            if ln.startswith("event:"):
                name = ln[6:].strip()
            elif ln.startswith("data:"):
                data.append(ln[5:].strip())
        if data:
            events.append((name, "\n".join(data)))
    assert events, "empty SSE stream"
    name, data = events[-1]
    if dialect(path) == "anthropic":
        assert name in ("message_stop", "error"), events[-3:]
        if name == "error":
            check_error(path, 400, data.encode())
    elif path == "/v1/responses":
        ends = ("response.completed", "response.incomplete", "response.failed", "error")
        assert name in ends and all(n not in ends for n, _ in events[:-1]), events[-3:]
        assert [json.loads(d)["sequence_number"] for _, d in events] == list(range(len(events))), events[:3]
    else:
        assert data == "[DONE]" or "error" in json.loads(data), events[-3:]
        if data != "[DONE]":
            check_error(path, 400, data.encode())


class Tally:
    """The cases one test sent, counted where they are sent: each test checks its own, whatever ran before it."""

    def __init__(self) -> None:
        self.sent: Counter[str] = Counter()  # "route status-class" → cases
        self.slow: list[tuple[float, str, bytes]] = []  # cases over a second (they stall the engine)
        self.last = b""  # the last case's response body

    def cases(self, n: int, **strategies: Any) -> Callable[[Callable[..., None]], None]:
        """Decorator: run the decorated case `n` times under Hypothesis right away, then check they were all sent."""
        def run(case: Callable[..., None]) -> None:
            fuzz_settings(n)(given(**strategies)(case))()
            self.check(n)
        return run

    def check(self, at_least: int) -> None:
        total = sum(self.sent.values())
        print(f"fuzz cases sent: {total} {dict(self.sent)}; slowest: {sorted(self.slow, reverse=True)[:5]}")
        # Fewer means Hypothesis gave up early (e.g. a strategy collapsed to a few values): the fuzzing did not happen.
        assert total >= at_least, f"only {total} of {at_least} cases were sent: {dict(self.sent)}"


def send(client: httpx.Client, tally: Tally, method: str, path: str, *, body: Any = None,
         content: Optional[bytes] = None, headers: Optional[dict[str, str]] = None) -> int:
    """Send one case and apply every check; returns the status."""
    if body is not None:
        content = json.dumps(body).encode()  # ASCII-escaped: lone surrogates and NaN travel as \ud800 / NaN
    started = time.perf_counter()
    with client.stream(method, path, content=content, headers=headers) as r:
        raw = r.read()
    if time.perf_counter() - started > 1.0:
        tally.slow.append((round(time.perf_counter() - started, 2), path, (content or b"")[:200]))
    ctype = r.headers.get("content-type", "")
    tally.last = raw
    tally.sent[f"{path if path in KNOWN else 'other'} {r.status_code // 100}xx"] += 1
    where = f"{method} {path} body={content[:300] if content else None!r} → {r.status_code} {raw[:300]!r}"
    assert r.status_code < 500, where
    if method == "HEAD":
        return r.status_code
    path = r.request.url.path  # as sent: the client resolves dot segments ("/v1/." is "/v1", an Ollama path)
    if r.status_code >= 400:
        try:
            check_error(path, r.status_code, raw)
        except (AssertionError, ValueError) as exc:
            raise AssertionError(f"bad error body: {where}") from exc
    elif "ndjson" in ctype or "event-stream" in ctype:
        try:
            check_stream(path, ctype, raw)
        except (AssertionError, ValueError) as exc:
            raise AssertionError(f"bad stream: {where}") from exc
    elif "json" in ctype:
        json.loads(raw)
    return r.status_code


# ---- the cases -----------------------------------------------------------------------------------------------

GENERATION = ["/api/generate", "/api/chat", "/v1/chat/completions", "/v1/completions", "/v1/messages",
              "/v1/messages/count_tokens", "/v1/responses"]


# Each test runs its Hypothesis cases through Tally.cases, which then checks how many were sent (4,628 in all).


# One case of each kind, shared by the test of that kind and by test_still_serving_afterwards's sample of them all.


def generation_case(client: httpx.Client, tally: Tally, path: str, case: st.DataObject) -> None:
    kind, body = case.draw(body_for(path), label="body")
    prio = case.draw(priority, label="priority")
    if kind == "valid":  # the OpenAPI document must accept what the server accepts
        jsonschema.validate(body, request_schema(path))
    status = send(client, tally, "POST", path, body=body, headers={"x-request-priority": prio} if prio else None)
    if kind == "valid":
        # OpenAI and Anthropic refuse a prompt longer than the (tiny) window, as the real APIs do
        too_long = status == 400 and (b"prompt is too long" in tally.last or b"context_length_exceeded" in tally.last)
        assert status == 200 or (too_long and path.startswith("/v1/")), body


def model_route_case(client: httpx.Client, tally: Tally, path: str, case: st.DataObject) -> None:
    kind, body = case.draw(body_for(path), label="body")
    if kind == "valid":
        jsonschema.validate(body, request_schema(path))
    status = send(client, tally, "POST", path, body=body)
    if kind == "valid":
        assert status == 200, body


DELETE_BODY = st.one_of(junk, st.fixed_dictionaries({"model": st.one_of(model, junk)}, optional={"name": junk}))


def delete_case(client: httpx.Client, tally: Tally, body: Any) -> None:
    # Local model folders are the user's: /api/delete must refuse them (400), never 5xx, never delete.
    send(client, tally, "DELETE", "/api/delete", body=body)


def files_of(*dirs: Path) -> dict[str, tuple[int, str]]:
    """Every file under `dirs`, as path → (size, sha256): what a delete must leave exactly as it was."""
    found: dict[str, tuple[int, str]] = {}
    for root in dirs:
        assert root.is_dir(), f"{root} is gone"
        for f in sorted(root.rglob("*")):
            if f.is_file():
                data = f.read_bytes()
                found[str(f)] = (len(data), hashlib.sha256(data).hexdigest())
    return found


@pytest.mark.parametrize("path", GENERATION)
def test_generation_routes(client: httpx.Client, path: str) -> None:
    tally = Tally()

    @tally.cases(400, case=st.data())
    def one(case: st.DataObject) -> None:
        generation_case(client, tally, path, case)


@pytest.mark.parametrize("path", ["/api/show", "/api/pull"])
def test_model_routes(client: httpx.Client, path: str) -> None:
    tally = Tally()

    @tally.cases(150, case=st.data())
    def one(case: st.DataObject) -> None:
        model_route_case(client, tally, path, case)


@pytest.mark.parametrize("path", RERANK)
def test_rerank_routes(client: httpx.Client, path: str) -> None:
    tally = Tally()

    @tally.cases(100, case=st.data())
    def one(case: st.DataObject) -> None:
        model_route_case(client, tally, path, case)


def test_delete_never_removes_local_models(client: httpx.Client, tiny_llama: Path, tiny_qwen2: Path) -> None:
    before = files_of(tiny_llama, tiny_qwen2)  # the server's two models: local folders, as models.yaml names them
    assert any(Path(f).suffix == ".safetensors" for f in before), before
    tally = Tally()
    # Every configured name, alias and tag, as is: Hypothesis may not draw each of them in 60 cases.
    for name in MODELS:
        for body in ({"model": name}, {"name": name}):
            status = send(client, tally, "DELETE", "/api/delete", body=body)
            assert status == 400, (body, status)

    @tally.cases(60 + 2 * len(MODELS), body=DELETE_BODY)
    def one(body: Any) -> None:
        delete_case(client, tally, body)

    assert files_of(tiny_llama, tiny_qwen2) == before  # nothing removed, added or changed


RAW = st.one_of(st.binary(max_size=64), st.sampled_from([
    b"{", b"[]", b"null", b'"x"', b"1e999999", b'{"model": "llama-tiny",}', b"\xff\xfe{}", b'{"a":' * 200,
    b"[" * 5000 + b"]" * 5000, b'{"model":"llama-tiny","prompt":"x"' + b" " * (MAX_BODY + 10) + b"}",
    b'{"model":"\\ud800"}', b'{"model":"llama-tiny","messages":[{"role":"user","content":"\\udfff"}]}',
    b'{"model":"llama-tiny","prompt":"\\ud800","stream":false,"options":{"num_predict":2}}']))
CONTENT_TYPES = st.sampled_from([None, "application/json", "text/plain", "application/x-www-form-urlencoded",
                                 "multipart/form-data; boundary=x", "application/json; charset=latin-1"])


def test_raw_bodies(client: httpx.Client) -> None:
    tally = Tally()

    @tally.cases(400, path=st.sampled_from(GENERATION + ["/api/show", "/api/pull"]), raw=RAW, ctype=CONTENT_TYPES)
    def one(path: str, raw: bytes, ctype: Optional[str]) -> None:
        raw_case(client, tally, path, raw, ctype)


def raw_case(client: httpx.Client, tally: Tally, path: str, raw: bytes, ctype: Optional[str]) -> None:
    send(client, tally, "POST", path, content=raw, headers={"content-type": ctype} if ctype else None)


READ_ROUTES = ["/", "/api/version", "/api/tags", "/api/ps", "/health", "/metrics", "/queue/stats", "/v1/models",
               "/v1/models/llama-tiny", "/v1/models/tiny-alias", "/openapi.json"]


def test_openapi_document_covers_every_route(server: Server, client: httpx.Client) -> None:
    doc = client.get("/openapi.json").json()
    # HEAD is Starlette's own beside every GET; a HEAD-only route (/api/blobs/…) is documented as such
    routed = {(r.path.replace("{model:path}", "{model}"), m.lower()) for r in server.app.routes
              for m in getattr(r, "methods", None) or () if m != "HEAD" or "GET" not in r.methods}
    documented = {(p, m) for p, ops in doc["paths"].items() for m in ops}
    assert routed == documented
    assert set(DOCUMENTED) == set(doc["paths"])
    jsonschema.Draft202012Validator.check_schema({"$defs": doc["components"]["schemas"]})
segment = st.text(alphabet=st.sampled_from("abcXYZ019-_.~:%"), max_size=12)


PATH_CASE = dict(method=st.sampled_from(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]),
                 path=st.one_of(st.sampled_from(READ_ROUTES + GENERATION), st.builds(
                     lambda p, s: p + s,
                     st.sampled_from(["/", "/api/", "/v1/", "/v1/models/", "/v1/messages/", "/api/chat/"]), segment)),
                 query=st.one_of(st.just(""), st.builds(lambda k, v: f"?{k}={v}", segment, segment)),
                 body=st.one_of(st.none(), junk))


def path_case(client: httpx.Client, tally: Tally, method: str, path: str, query: str, body: Any) -> None:
    send(client, tally, method, path + query, body=None if method in ("GET", "HEAD", "OPTIONS") else body)


def test_paths_and_methods(client: httpx.Client) -> None:
    tally = Tally()

    @tally.cases(300, **PATH_CASE)
    def one(method: str, path: str, query: str, body: Any) -> None:
        path_case(client, tally, method, path, query, body)


KNOWN = set(GENERATION + READ_ROUTES + RERANK + ["/api/show", "/api/pull", "/api/delete"])


# Blob uploads: raw bytes under a digest that matches them, names another blob, or is no digest at all. Bodies go
# past MAX_BODY too: uploads are capped by max_blob_bytes instead.
BLOB_BODY = st.one_of(st.binary(max_size=512), st.integers(MAX_BODY, 2 * MAX_BODY).map(lambda n: b"\x01" * n))
BLOB_DIGEST = st.sampled_from(["matching", "matching-dash", "other", "junk"])
JUNK_DIGEST = st.one_of(segment, st.sampled_from(["sha256:", "sha256:" + "g" * 64, "sha256:" + "a" * 65, "a" * 64,
                                                  "SHA256:" + "a" * 64, "sha512:" + "a" * 64, "sha256%3A" + "a" * 64,
                                                  "sha256:" + "a" * 63 + "%00"]))


def blob_case(client: httpx.Client, tally: Tally, method: str, body: bytes, digest: str, junk_digest: str) -> None:
    hexdigest = hashlib.sha256(body).hexdigest()
    named = {"matching": f"sha256:{hexdigest}", "matching-dash": f"sha256-{hexdigest.upper()}",
             "other": f"sha256:{hashlib.sha256(b'not-the-body:' + body).hexdigest()}", "junk": junk_digest}[digest]
    status = send(client, tally, method, f"/api/blobs/{named}", content=body if method == "POST" else None)
    if digest.startswith("matching"):
        assert status in ((200, 201) if method == "POST" else (200, 404)), (method, named, status)
    elif digest == "other":
        assert status == (400 if method == "POST" else 404), (method, named, status)
    else:
        assert status in (400, 404, 405), (method, named, status)


def test_blob_routes(server: Server, client: httpx.Client) -> None:
    tally = Tally()

    @tally.cases(120, method=st.sampled_from(["HEAD", "POST"]), body=BLOB_BODY, digest=BLOB_DIGEST,
                 junk_digest=JUNK_DIGEST)
    def one(method: str, body: bytes, digest: str, junk_digest: str) -> None:
        blob_case(client, tally, method, body, digest, junk_digest)

    root = server.app.state.ctx.blobs.root  # every failed upload left nothing; every stored one is whole
    for f in root.iterdir():
        assert f.name.startswith("sha256-") and hashlib.sha256(f.read_bytes()).hexdigest() == f.name[7:], f


ABUSE = ["generation", "model route", "raw", "path", "delete", "blob"]
MODEL_ROUTES = ["/api/show", "/api/pull"]


def test_still_serving_afterwards(server: Server, client: httpx.Client) -> None:
    # The abuse first, here: a sample of every kind of case above (streams and not, broken and junk bodies, raw
    # bytes, odd paths and methods, deletes), so this test holds alone, in any order, whatever else ran or not.
    tally = Tally()
    kinds: Counter[str] = Counter()

    @tally.cases(240, kind=st.sampled_from(ABUSE), case=st.data())
    def one(kind: str, case: st.DataObject) -> None:
        kinds[kind] += 1
        if kind == "generation":
            generation_case(client, tally, case.draw(st.sampled_from(GENERATION), label="path"), case)
        elif kind == "model route":
            model_route_case(client, tally, case.draw(st.sampled_from(MODEL_ROUTES), label="path"), case)
        elif kind == "raw":
            raw_case(client, tally, case.draw(st.sampled_from(GENERATION + MODEL_ROUTES), label="path"),
                     case.draw(RAW, label="raw"), case.draw(CONTENT_TYPES, label="content-type"))
        elif kind == "path":
            path_case(client, tally, **{k: case.draw(v, label=k) for k, v in PATH_CASE.items()})
        elif kind == "blob":
            blob_case(client, tally, case.draw(st.sampled_from(["HEAD", "POST"]), label="method"),
                      case.draw(BLOB_BODY, label="body"), case.draw(BLOB_DIGEST, label="digest"),
                      case.draw(JUNK_DIGEST, label="junk digest"))
        else:
            delete_case(client, tally, case.draw(DELETE_BODY, label="body"))

    assert set(kinds) == set(ABUSE), kinds  # every kind was sent, not just 240 cases of a few

    r = client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "healthy", r.text
    r = client.post("/api/chat", json={"model": "llama-tiny", "stream": False, "options": {"num_predict": 3},
                                       "messages": [{"role": "user", "content": "still there?"}]})
    assert r.status_code == 200 and r.json()["done"] is True, r.text
    # Nothing lost: every request the fuzzers started has finished in the engine.
    deadline = time.monotonic() + 10
    while server.engine.status().in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.engine.status().in_flight == 0 and server.engine.alive
    # The server's own count of 5xx answers, as a cross-check of the per-case assertions.
    fivexx = [ln for ln in client.get("/metrics").text.splitlines()
              if ln.startswith("mlx_requests_total") and 'status="5' in ln]
    assert not fivexx, fivexx
