"""Random malformed requests for both APIs, and what a server must answer them: the CI fuzz test
(tests/test_serve_fuzz.py) and the long run (benchmarks/fuzz_serve.py) draw from here.

A case starts from a valid request and breaks it: fields replaced by values of every JSON type (huge
and negative numbers, long and odd strings, nesting), required fields dropped, unknown fields added,
the bytes cut, corrupted or replaced. A broken request may still be valid by chance: it then gets a
2xx, but never one that generates more than a few tokens (max_tokens stays small, or invalid).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from serve.proto.gptoss.v1 import gptoss_pb2 as pb

MODEL = "tiny-test"
MAX_TOKENS = 3
CHAT_FIELDS = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
               "min_p", "n", "seed", "stop", "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs",
               "tools", "tool_choice", "reasoning_effort", "include_reasoning", "stream", "stream_options",
               "response_format", "metadata", "user", "timeout", "logit_bias", "parallel_tool_calls")
COMPLETION_FIELDS = ("model", "prompt", "max_tokens", "temperature", "top_p", "n", "seed", "stop", "logprobs",
                     "echo", "suffix", "best_of", "stream", "timeout")
# Values that stay invalid for max_tokens, so a request never runs long by chance.
BAD_MAX_TOKENS = (0, -1, 2**31, 10**12, 1.5, "4", [], {}, True, 1e300)


@dataclass(frozen=True)
class HttpCase:
    path: str  # "chat/completions" or "completions"
    body: bytes
    what: str  # how it was broken, for reports


@dataclass(frozen=True)
class GrpcCase:
    body: bytes  # a GenerateRequest's bytes, broken or not
    what: str


def random_value(rng: random.Random, depth: int = 0):
    """A JSON value of any type, often extreme."""
    kind = rng.randrange(12 if depth < 3 else 9)
    if kind == 0:
        return rng.choice([0, -1, 1, 2**31, -(2**63), 2**64, 10**30, 7])
    if kind == 1:
        return rng.choice([0.5, -1e300, 1e300, 3.14159, -0.0, 1e-320])
    if kind == 2:
        return rng.choice(["", "x", "hot", "\u0000", "\ud7ff\u2028", "💥" * 10, "<|start|>", "a" * rng.randrange(1, 5000)])
    if kind == 3:
        return rng.choice([True, False])
    if kind == 4:
        return None
    if kind == 5:
        return rng.choice(["auto", "none", "required", "low", "high", "function", "user", "tool"])
    if kind == 6:
        return {"role": rng.choice(["user", "robot", "tool", "assistant", ""]), "content": rng.choice(["hi", 5, None])}
    if kind == 7:
        return [rng.randrange(-5, 300_000) for _ in range(rng.randrange(0, 6))]
    if kind == 8:
        return {"type": "function", "function": {"name": rng.choice(["f", "bad name", "", "x" * 100])}}
    if kind == 9:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    if kind == 10:
        return {rng.choice(["a", "type", "role", "content", "x" * 70]): random_value(rng, depth + 1)
                for _ in range(rng.randrange(0, 4))}
    nested: object = []
    for _ in range(rng.choice([5, 70, 300])):  # past gateway.max_json_depth (64) but for the first
        nested = [nested]
    return nested


def valid_chat() -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": MAX_TOKENS}


def valid_completion() -> dict:
    return {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": MAX_TOKENS}


def http_case(rng: random.Random) -> HttpCase:
    chat = rng.random() < 0.6
    body, fields = (valid_chat(), CHAT_FIELDS) if chat else (valid_completion(), COMPLETION_FIELDS)
    path = "chat/completions" if chat else "completions"
    whats = []
    for _ in range(rng.randrange(1, 4)):
        move = rng.randrange(10)
        field = rng.choice(fields)
        if move < 6:
            body[field] = rng.choice(BAD_MAX_TOKENS) if "max" in field and "tokens" in field else random_value(rng)
            whats.append(f"{field}={json.dumps(body[field])[:40]}")
        elif move < 7:
            body.pop(rng.choice(("messages", "prompt", "model")), None)
            whats.append("dropped a field")
        elif move < 8:
            body[rng.choice(["foo", "repetition_penalty", "x" * 300, ""])] = random_value(rng)
            whats.append("unknown field")
        elif move < 9 and chat:
            body["messages"] = [random_value(rng) for _ in range(rng.randrange(0, 4))]
            whats.append("messages replaced")
        else:
            body["n"] = rng.choice([0, -1, 9, 2**31, "2"])
            whats.append(f"n={body['n']}")
    if body.get("max_tokens") == MAX_TOKENS and isinstance(body.get("n"), int) and body["n"] > 8:
        body["n"] = 9
    raw = json.dumps(body, allow_nan=True).encode()
    damage = rng.randrange(10)
    if damage == 0:
        raw = raw[: rng.randrange(len(raw))]
        whats.append("truncated")
    elif damage == 1:
        at = rng.randrange(len(raw))
        raw = raw[:at] + bytes([rng.randrange(256)]) + raw[at + 1:]
        whats.append("a byte flipped")
    elif damage == 2:
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        whats.append("random bytes")
    elif damage == 3 and rng.random() < 0.1:
        raw = raw[:-1] + b', "pad": "' + b"x" * (2 << 20) + b'"}'  # past gateway.max_request_bytes
        whats.append("2 MiB body")
    return HttpCase(path, raw, "; ".join(whats))


def grpc_case(rng: random.Random) -> GrpcCase:
    request = pb.GenerateRequest(model=rng.choice(["", MODEL, MODEL, "other", "x" * 300]),
                                 request_id=rng.choice(["", "", "bad\nid", "r" * 300, "fine-id"]))
    kind = rng.randrange(4)
    if kind == 0:
        request.token_ids.ids.extend(rng.randrange(0, 2**32) if rng.random() < 0.2 else rng.randrange(0, 300_000)
                                     for _ in range(rng.randrange(0, 5)))
    elif kind == 1:
        request.text = rng.choice(["", "hi", "\u0000", "a" * 3000, "<|call|>"])
    elif kind == 2:
        chat = request.chat
        for _ in range(rng.randrange(0, 4)):
            message = chat.messages.add(role=rng.choice(["user", "robot", "tool", "assistant", "system", ""]),
                                        content=rng.choice(["hi", "", "x" * 500]))
            if rng.random() < 0.3:
                message.tool_calls.add(name=rng.choice(["f", "bad name", ""]), arguments=rng.choice(["{}", "{"]))
            if rng.random() < 0.2:
                message.tool_call_id = rng.choice(["nope", "call_1"])
        for _ in range(rng.randrange(0, 3)):
            chat.tools.add(name=rng.choice(["f", "g", "bad name", ""]),
                           parameters_json=rng.choice(["", "{", "5", '{"type": "object"}', "[" * 300 + "]" * 300]))
        chat.tool_choice = rng.choice(["", "auto", "none", "required", "f", "missing"])
        chat.reasoning_effort = rng.choice(["", "low", "extreme"])
    s = request.sampling
    s.max_tokens = rng.choice([0, 1, MAX_TOKENS, 2**32 - 1, 100_000])
    for name, values in (("temperature", [-1.0, 0.0, 0.7, float("nan"), float("inf")]), ("top_p", [0.0, 0.5, 2.0]),
                         ("n", [0, 1, 3, 2**32 - 1]), ("logprobs", [0, 5, 2**32 - 1]), ("seed", [0, 2**64 - 1]),
                         ("presence_penalty", [-3.0, 1.0]), ("min_p", [-0.5, 0.1]), ("top_k", [0, 5])):
        if rng.random() < 0.3:
            setattr(s, name, rng.choice(values))
    if rng.random() < 0.2:
        s.stop.extend(rng.choice(["", "x", "y" * 1000]) for _ in range(rng.randrange(1, 20)))
    raw = request.SerializeToString()
    damage = rng.randrange(8)
    if damage == 0 and raw:
        raw = raw[: rng.randrange(len(raw))]
    elif damage == 1:
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 100)))
    elif damage == 2 and rng.random() < 0.1:
        raw += pb.GenerateRequest(model="x" * (2 << 20)).SerializeToString()  # past the size limit
    return GrpcCase(raw, f"kind {kind}, damage {damage}")


def http_verdict(status: int, body: bytes) -> str | None:
    """None when the answer is acceptable; else what is wrong with it. A 504 for the request's own
    `timeout` (a tiny one is a valid field) is the client's doing, not a crash."""
    if status < 400:
        return None
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return f"{status} without OpenAI's error shape: {body[:300]!r}"
    if status >= 500 and not (status == 504 and error.get("type") == "timeout_error"):
        return f"server error {status}: {body[:300]!r}"
    if not isinstance(error.get("message"), str) or not error["message"] or "type" not in error:
        return f"{status} with an empty or shapeless error: {error}"
    if len(body) > 4000:
        return f"{status} with a {len(body)}-byte body (a value echoed whole?)"
    return None


SERVER_SIDE_CODES = ("INTERNAL", "UNKNOWN", "UNAVAILABLE", "DATA_LOSS", "UNIMPLEMENTED")


def grpc_verdict(code_name: str, details: str) -> str | None:
    """None when the status is acceptable; else what is wrong with it."""
    if code_name == "OK":
        return None
    if code_name in SERVER_SIDE_CODES:
        return f"{code_name}: {details[:300]}"
    if not details:
        return f"{code_name} without details"
    return None
