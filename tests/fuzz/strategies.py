"""Hypothesis strategies for requests to every route of both daemons.

Each request is mostly well formed with a few fields bent (the inputs that reach deepest), or a
random JSON value in place of a field, or a body that is not JSON at all, or odd headers. Every
inference request asks for at most a handful of tokens (or for a count the server must refuse):
a fuzz run must spend its time on many requests, not on long generations.

The served model's id is never the target of a load, unload or pin: unloading it on purpose is a
legitimate request, and the run checks afterwards that nothing else took it down.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

# Only ids that are never served: lifecycle routes may act on these freely.
OTHER_MODELS = ["attacker/any-repo", "org/missing-model", "x", "../../etc/passwd", "tiny ", "TINY", "tiny\x00"]
# Values that turn up in real attacks and bugs: out-of-range ids, floats that underflow in float32, huge counts.
EDGE_NUMBERS: list[Any] = [
    0,
    -1,
    1,
    2,
    999999,
    -999999,
    2**31,
    2**63,
    -(2**63),
    2**64,
    1e-300,
    -1e-300,
    1e-45,
    1e-38,
    5e-324,
    1e308,
    -1e308,
    3.4e38,
    0.5,
    1.0000001,
    0.9999999,
    2.0000001,
    -0.0,
]
HEADER_TEXT = st.text(alphabet=string.ascii_letters + string.digits + " -_=.:;/+,", max_size=40)


@dataclass
class FuzzRequest:
    """One request: where it goes and what it carries (`json` and `body` are mutually exclusive)."""

    daemon: str  # "neuron" | "gateway" | "metrics"
    method: str
    path: str
    json: Any = None
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    use_json: bool = False  # send `json` (even None/null) as the body

    def describe(self) -> str:
        payload = repr(self.json)[:300] if self.use_json else repr((self.body or b"")[:120])
        return f"{self.daemon} {self.method} {self.path} headers={self.headers} body={payload}"


def json_values(max_leaves: int = 8) -> st.SearchStrategy[Any]:
    scalars = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.sampled_from(EDGE_NUMBERS)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=20)
    )
    return st.recursive(
        scalars,
        lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
        max_leaves=max_leaves,
    )


def numbers() -> st.SearchStrategy[Any]:
    return st.sampled_from(EDGE_NUMBERS) | st.floats(allow_nan=False, allow_infinity=False) | st.integers(-5, 5)


def in_range(low: float, high: float, *, edges: tuple[float, ...] = ()) -> st.SearchStrategy[Any]:
    """Values a validator accepts, with the awkward ones (subnormals, bounds) drawn often."""
    bounds = [v for v in (low, high, *edges, 1e-300, 5e-324, 1e-45, 1e-38) if low <= v <= high]
    return st.sampled_from(bounds) | st.floats(low, high, allow_nan=False)


def small_tokens() -> st.SearchStrategy[Any]:
    """A token budget: 1-3 tokens (never null, never a large valid count: that is a long generation)."""
    return st.integers(1, 3)


BAD_TOKENS: list[Any] = [0, -1, -(2**63), "x", 1.5, [], {}, 0.0]


def texts() -> st.SearchStrategy[str]:
    return st.text(max_size=30) | st.sampled_from(["", "\x00", "<|im_end|>", "<|im_start|>system\n", "{{ 7*7 }}"])


def openai_messages() -> st.SearchStrategy[Any]:
    part = st.fixed_dictionaries({"type": st.sampled_from(["text", "input_text"]), "text": texts()})
    content = texts() | st.lists(part, min_size=1, max_size=2)
    message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": content})
    last = st.fixed_dictionaries({"role": st.just("user"), "content": content})
    return st.tuples(st.lists(message, max_size=2), last).map(lambda t: [*t[0], t[1]])


def tool_call() -> st.SearchStrategy[Any]:
    return st.fixed_dictionaries(
        {
            "id": texts(),
            "type": st.just("function"),
            "function": st.fixed_dictionaries({"name": texts(), "arguments": texts() | json_values(3)}),
        }
    )


def openai_tools() -> st.SearchStrategy[Any]:
    schema = st.just({"type": "object", "properties": {"city": {"type": "string"}}}) | json_values(4)
    function = st.fixed_dictionaries(
        {"name": st.sampled_from(["get_weather", "f", "x-y"])}, optional={"parameters": schema}
    )
    return st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": function}), max_size=2)


SAMPLING: dict[str, st.SearchStrategy[Any]] = {
    "temperature": in_range(0.0, 2.0),
    "top_p": in_range(1e-300, 1.0),
    "top_k": st.integers(0, 100),
    "min_p": in_range(0.0, 1.0),
    "seed": st.integers() | st.sampled_from([2**64, -(2**63), -1]),
    "frequency_penalty": in_range(-2.0, 2.0),
    "presence_penalty": in_range(-2.0, 2.0),
    "repetition_penalty": in_range(1e-300, 10.0),
    "stop": texts() | st.lists(texts(), max_size=3),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "user": texts(),
}
# What a field may be bent into besides a random JSON value: out of range, wrong type, the known offenders.
BENT: dict[str, st.SearchStrategy[Any]] = {
    "max_tokens": st.sampled_from(BAD_TOKENS),
    "max_completion_tokens": st.sampled_from(BAD_TOKENS),
    "max_output_tokens": st.sampled_from(BAD_TOKENS),
    "temperature": numbers(),
    "top_p": numbers(),
    "top_k": numbers(),
    "min_p": numbers(),
    "repetition_penalty": numbers(),
    "n": st.sampled_from([2, 0, -1]),
    "logprobs": st.sampled_from([True, 5, -1]),
    "prompt": st.sampled_from([[999999], [-1], [2**40], [0, 49152], [], [[]], [""], ["a", "b"]]),
    "messages": st.sampled_from(
        [
            [],
            [{"role": "user", "content": [{"type": [], "text": "x"}]}],
            [{"role": "user", "content": [{"type": {"a": 1}, "text": "x"}]}],
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:x"}}]}],
            [{"role": "user", "content": [{"type": "text", "text": 1}]}],
            [{"role": "bogus", "content": "x"}],
            [{"role": "user"}],
            [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}],
            [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "x", "content": [{"type": []}]}]}],
        ]
    ),
    "tools": st.sampled_from([[{"type": "function"}], [{"type": "function", "function": {"name": []}}], [1]]),
    "response_format": st.sampled_from([{"type": "json_schema"}, {"type": "x"}, {"type": "json_object"}]),
    "stream": st.sampled_from(["yes", 1, None]),
}


def model_field(served: str) -> st.SearchStrategy[Any]:
    return st.just(served)


def chat_body(served: str) -> st.SearchStrategy[Any]:
    """Mostly plain chats; one in six brings tools or a response format (each new schema costs a grammar compile)."""
    required = {"model": model_field(served), "messages": openai_messages(), "max_tokens": small_tokens()}
    plain = st.fixed_dictionaries(required, optional={**SAMPLING, "include_reasoning": st.booleans()})
    featured = st.fixed_dictionaries(
        required,
        optional={
            **SAMPLING,
            "tools": openai_tools(),
            "tool_choice": st.sampled_from(["auto", "none"]),
            "response_format": st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])}),
        },
    )
    return st.one_of(plain, plain, plain, plain, plain, featured)


def completion_body(served: str) -> st.SearchStrategy[Any]:
    ids = st.lists(st.integers(0, 49151), min_size=1, max_size=6)
    prompt = texts().filter(bool) | ids | st.lists(texts().filter(bool), min_size=1, max_size=1)
    return st.fixed_dictionaries(
        {"model": model_field(served), "prompt": prompt, "max_tokens": small_tokens()}, optional=SAMPLING
    )


def anthropic_blocks() -> st.SearchStrategy[Any]:
    text = st.fixed_dictionaries({"type": st.just("text"), "text": texts()})
    return st.lists(text, min_size=1, max_size=2)


def anthropic_messages() -> st.SearchStrategy[Any]:
    message = st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant"]), "content": texts() | anthropic_blocks()}
    )
    last = st.fixed_dictionaries({"role": st.just("user"), "content": texts() | anthropic_blocks()})
    return st.tuples(st.lists(message, max_size=2), last).map(lambda t: [*t[0], t[1]])


def anthropic_body(served: str, *, count_tokens: bool) -> st.SearchStrategy[Any]:
    required: dict[str, Any] = {"model": model_field(served), "messages": anthropic_messages()}
    optional: dict[str, Any] = {
        "system": texts() | anthropic_blocks(),
        "tools": st.lists(
            st.fixed_dictionaries(
                {"name": st.sampled_from(["get_weather", "f"])}, optional={"input_schema": json_values(4)}
            ),
            max_size=2,
        ),
        "tool_choice": st.fixed_dictionaries({"type": st.sampled_from(["auto", "any", "none"])}),
        "thinking": st.fixed_dictionaries(
            {"type": st.sampled_from(["enabled", "disabled"]), "budget_tokens": numbers()}
        ),
    }
    if not count_tokens:
        required["max_tokens"] = small_tokens()
        optional.update(
            {
                "stream": st.booleans(),
                "stop_sequences": st.lists(texts(), max_size=3),
                "temperature": in_range(0.0, 1.0),
                "top_p": in_range(1e-300, 1.0),
                "top_k": st.integers(0, 100),
                "metadata": st.fixed_dictionaries({"user_id": texts()}),
            }
        )
    return st.fixed_dictionaries(required, optional=optional)


def responses_body(served: str) -> st.SearchStrategy[Any]:
    part = st.fixed_dictionaries({"type": st.just("input_text"), "text": texts()})
    item = st.fixed_dictionaries(
        {
            "type": st.just("message"),
            "role": st.sampled_from(["user", "system", "developer"]),
            "content": texts() | st.lists(part, min_size=1, max_size=2),
        }
    )
    return st.fixed_dictionaries(
        {
            "model": model_field(served),
            "input": texts() | st.lists(item, min_size=1, max_size=3),
            "max_output_tokens": small_tokens(),
        },
        optional={
            "instructions": texts(),
            "stream": st.booleans(),
            "temperature": in_range(0.0, 2.0),
            "top_p": in_range(1e-300, 1.0),
            "tools": st.lists(st.fixed_dictionaries({"type": st.just("function"), "name": st.just("f")}), max_size=1),
            "text": st.fixed_dictionaries(
                {"format": st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])})}
            ),
            "metadata": st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
        },
    )


def load_body() -> st.SearchStrategy[Any]:
    sources = st.sampled_from(
        ["/etc/passwd", "../../etc", "~root/x", "/tmp/a\x00b", "x.gguf", "attacker/any-repo", "/", "\x00", "a" * 500]
    )
    return st.fixed_dictionaries(
        {"model_id": st.sampled_from(OTHER_MODELS)},
        optional={
            "source": sources,
            "dtype": st.sampled_from(["auto", "float32", "int3"]),
            "devices": st.lists(st.integers(-2, 64), max_size=2),
            "context_length": numbers(),
            "revision": texts(),
        },
    )


def admin_body() -> st.SearchStrategy[Any]:
    return st.fixed_dictionaries(
        {"model": st.sampled_from(OTHER_MODELS)},
        optional={"node": st.sampled_from(["real", "nope", ""]), "pinned": st.booleans()},
    )


@st.composite
def bent(draw: st.DrawFn, body: st.SearchStrategy[Any]) -> Any:
    """A valid body with up to two fields bent: out of range, the wrong type, a known offender, or random JSON."""
    value = draw(body)
    if not isinstance(value, dict):
        return value
    value = dict(value)
    keys = sorted(set(value) | set(BENT))
    for _ in range(draw(st.sampled_from([0, 1, 1, 2]))):
        key = draw(st.sampled_from(keys))
        options = BENT.get(key)
        if key not in _BUDGET_KEYS and (options is None or draw(st.booleans())):
            value[key] = draw(json_values(4))
        elif options is not None:
            value[key] = draw(options)
    return value


def _route_bodies(served: str) -> dict[tuple[str, str], st.SearchStrategy[Any]]:
    chat = chat_body(served)
    return {
        ("neuron", "/v1/chat/completions"): chat,
        ("neuron", "/v1/completions"): completion_body(served),
        ("neuron", "/v1/chat/tokenize"): chat,
        ("neuron", "/models/load"): load_body(),
        ("neuron", "/models/unload"): st.fixed_dictionaries({"model_id": st.sampled_from(OTHER_MODELS)}),
        ("neuron", "/admin/defragment"): json_values(2),
        ("neuron", "/admin/fault"): st.fixed_dictionaries({"model_id": model_field(served), "count": numbers()}),
        ("gateway", "/v1/chat/completions"): chat,
        ("gateway", "/v1/completions"): completion_body(served),
        ("gateway", "/v1/messages"): anthropic_body(served, count_tokens=False),
        ("gateway", "/v1/messages/count_tokens"): anthropic_body(served, count_tokens=True),
        ("gateway", "/v1/responses"): responses_body(served),
        ("gateway", "/admin/load"): admin_body(),
        ("gateway", "/admin/unload"): admin_body(),
        ("gateway", "/admin/pin"): admin_body(),
    }


def get_routes(served: str) -> list[tuple[str, str]]:
    return [
        ("neuron", "/version"),
        ("neuron", "/discovery"),
        ("neuron", "/health"),
        ("neuron", "/models"),
        ("neuron", f"/models/{served}/endpoint"),
        ("neuron", "/models/nope/endpoint"),
        ("gateway", "/v1/models"),
        ("gateway", f"/v1/models/{served}"),
        ("gateway", "/v1/models/nope"),
        ("gateway", "/health"),
        ("gateway", "/admin/state"),
        ("metrics", "/metrics"),
    ]


# Keys a mutation never touches: a null or huge token budget would mean a long generation, not a bad input.
_BUDGET_KEYS = frozenset({"max_tokens", "max_completion_tokens", "max_output_tokens"})


@st.composite
def mutated(draw: st.DrawFn, body: st.SearchStrategy[Any]) -> Any:
    """A body with one field replaced by a random JSON value, or dropped, or a junk field added."""
    value = draw(body)
    if not isinstance(value, dict) or not value:
        return value
    keys = sorted(k for k in value if k not in _BUDGET_KEYS)
    if not keys:
        return value
    key = draw(st.sampled_from(keys))
    action = draw(st.sampled_from(["replace", "drop", "add"]))
    value = dict(value)
    if action == "replace":
        value[key] = draw(json_values(6))
    elif action == "drop":
        del value[key]
    else:
        value[draw(st.text(max_size=10))] = draw(json_values(4))
    return value


RAW_BODIES = [
    b"",
    b"{",
    b"[]",
    b"null",
    b'"text"',
    b"NaN",
    b'{"model": NaN}',
    b'{"max_tokens": 1e999}',
    b"\xef\xbb\xbf{}",
    b"\xff\xfe\x00\x00",
    b'{"a":1}{"b":2}',
    b'{"model":"tiny","messages":[{"role":"user","content":"\\ud800"}],"max_tokens":1}',
    b"[" * 200 + b"]" * 200,
    b"[" * 300 + b"]" * 300,
    b"{" * 1000,
]


def raw_body() -> st.SearchStrategy[bytes]:
    return st.sampled_from(RAW_BODIES) | st.binary(max_size=64)


def request_headers() -> st.SearchStrategy[dict[str, str]]:
    return st.fixed_dictionaries(
        {},
        optional={
            "Content-Type": st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded"])
            | HEADER_TEXT,
            "x-request-id": HEADER_TEXT | st.sampled_from(["x event=admin.login user=root", "a" * 300, "id\tx"]),
            "Authorization": HEADER_TEXT | st.sampled_from(["Bearer", "Bearer ", "Basic Zm9vOmJhcg=="]),
            "Content-Encoding": st.sampled_from(["gzip", "deflate", "br", "zstd", "identity", "x-gzip", "gzip, br"])
            | HEADER_TEXT,
            "Accept": st.sampled_from(["text/html", "*/*", "text/event-stream"]),
        },
    )


def random_path() -> st.SearchStrategy[str]:
    segment = st.text(alphabet=string.ascii_letters + string.digits + "-._~%", min_size=0, max_size=12)
    return st.lists(segment, min_size=1, max_size=4).map(lambda parts: "/" + "/".join(parts)) | st.sampled_from(
        ["/v1/chat/completions/", "/V1/models", "/v1//models", "/admin", "/admin/", "/models/load/x", "/%00"]
    )


def fuzz_requests(served: str) -> st.SearchStrategy[FuzzRequest]:
    """The mix: structured bodies (some mutated), random GETs, raw bodies, odd methods and paths."""
    bodies = _route_bodies(served)
    post_routes = sorted(bodies)

    @st.composite
    def structured(draw: st.DrawFn) -> FuzzRequest:
        daemon, path = draw(st.sampled_from(post_routes))
        strategy = bodies[(daemon, path)]
        body = draw(bent(strategy) | mutated(strategy))
        headers = draw(st.just({}) | st.just({}) | request_headers().filter(lambda h: "Content-Encoding" not in h))
        if path.startswith("/v1/messages"):
            headers = {"anthropic-version": "2023-06-01", **headers}
        return FuzzRequest(daemon, "POST", path, json=body, headers=headers, use_json=True)

    @st.composite
    def raw(draw: st.DrawFn) -> FuzzRequest:
        daemon, path = draw(st.sampled_from(post_routes))
        return FuzzRequest(daemon, "POST", path, body=draw(raw_body()), headers=draw(request_headers()))

    @st.composite
    def gets(draw: st.DrawFn) -> FuzzRequest:
        daemon, path = draw(st.sampled_from(get_routes(served)))
        return FuzzRequest(daemon, "GET", path, headers=draw(st.just({}) | request_headers()))

    @st.composite
    def elsewhere(draw: st.DrawFn) -> FuzzRequest:
        daemon = draw(st.sampled_from(["neuron", "gateway"]))
        method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]))
        path = draw(random_path() | st.sampled_from([p for d, p in post_routes if d == daemon]))
        body = draw(st.none() | raw_body())
        return FuzzRequest(daemon, method, path, body=body, headers=draw(st.just({}) | request_headers()))

    return st.one_of(structured(), structured(), structured(), structured(), raw(), gets(), elsewhere())


# ---- mutation: many cheap variants of the requests hypothesis drew -----------------------------------
# Hypothesis draws the structured seeds (it explores shapes well but costs milliseconds per example);
# plain random mutations of those seeds make up the bulk of a run at microseconds each.

_INFERENCE = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/responses"})
_VALUE_BANK: list[Any] = [
    *EDGE_NUMBERS,
    None,
    True,
    False,
    "",
    "\x00",
    "x" * 5000,
    [],
    {},
    [[]],
    {"type": []},
    {"type": {"a": 1}},
    [{"type": []}],
    [{"type": {"a": 1}, "text": "x"}],
    [999999],
    [-1],
    [0, 999999],
    {"role": "user", "content": "x"},
    [{"role": "user", "content": [{"type": "text", "text": 1}]}],
    "tiny",
]


def _random_value(rng: Any, depth: int = 0) -> Any:
    roll = rng.random()
    if roll < 0.6 or depth > 3:
        return rng.choice(_VALUE_BANK)
    if roll < 0.8:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(["type", "text", "role", "content", "x", ""]): _random_value(rng, depth + 1) for _ in range(2)}


def _mutate_json(rng: Any, value: Any) -> Any:
    if not isinstance(value, dict) or not value:
        return _random_value(rng)
    value = dict(value)
    keys = [k for k in value if k not in _BUDGET_KEYS]
    action = rng.random()
    if keys and action < 0.5:
        value[rng.choice(keys)] = _random_value(rng)
    elif keys and action < 0.65:
        del value[rng.choice(keys)]
    elif action < 0.8:
        value[rng.choice(["stream", "tools", "stop", "n", "seed", "top_k", "zzz"])] = _random_value(rng)
    else:
        nested = value.get("messages")
        if isinstance(nested, list) and nested and isinstance(nested[0], dict):
            first = dict(nested[0])
            first[rng.choice(["content", "role", "tool_calls", "name"])] = _random_value(rng)
            value["messages"] = [first, *nested[1:]]
    return value


def mutate(rng: Any, seed: FuzzRequest, post_paths: dict[str, list[str]]) -> FuzzRequest:
    """A variant of `seed`: one field bent, its bytes damaged, a header added, or its body sent elsewhere."""
    req = FuzzRequest(seed.daemon, seed.method, seed.path, seed.json, seed.body, dict(seed.headers), seed.use_json)
    roll = rng.random()
    if req.use_json and roll < 0.45:
        req.json = _mutate_json(rng, req.json)
    elif req.use_json and roll < 0.7:
        # Cut short and a stray byte appended: never valid JSON (a damaged budget key must not mean a long generation).
        raw = json.dumps(req.json).encode()
        cut = rng.randint(0, max(0, len(raw) - 2))
        req.body, req.json, req.use_json = raw[:cut] + bytes([rng.randint(0, 255)]), None, False
    elif roll < 0.85:
        req.headers[rng.choice(["Content-Encoding", "Content-Type", "x-request-id", "Authorization"])] = rng.choice(
            ["gzip", "deflate", "br", "zstd", "identity", "text/plain", "Bearer x", "a=b c=d", "-" * 200]
        )
    elif req.use_json and isinstance(req.json, dict) and any(k in req.json for k in _BUDGET_KEYS):
        req.path = rng.choice(post_paths.get(req.daemon, [req.path]))
    else:
        req.method = rng.choice(["GET", "PUT", "DELETE", "PATCH"])
    return req
