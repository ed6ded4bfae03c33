"""The Ollama API on top of llama-server's OpenAI API, so the `ollama` client works unchanged.

Pure translations (request -> OpenAI body, OpenAI chunk -> Ollama line) are kept apart from
the streaming glue, and are tested directly.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import msgspec

from proto import GgufSummary

from .errors import ApiError

OLLAMA_VERSION = "0.6.8"  # the API level we mirror; clients only check that it answers

# Ollama `options` that have an OpenAI/llama-server request field of another name.
OPTION_NAMES = {
    "num_predict": "max_tokens",
    "stop": "stop",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "repeat_penalty": "repeat_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "typical_p": "typical_p",
}


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def now_iso() -> str:
    return iso(time.time())


def parse_body(body: bytes) -> dict[str, Any]:
    try:
        data = msgspec.json.decode(body) if body else None
    except msgspec.DecodeError as e:
        raise ApiError(400, f"request body is not valid JSON: {e}", "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object", "invalid_request")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "missing required field `model`", "missing_model")
    return data


def _options(req: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    opts = req.get("options") or {}
    if not isinstance(opts, dict):
        raise ApiError(400, "`options` must be an object", "invalid_request")
    for k, v in opts.items():
        if k in OPTION_NAMES:
            out[OPTION_NAMES[k]] = v
    if out.get("max_tokens") is not None and out["max_tokens"] < 0:
        del out["max_tokens"]  # Ollama's -1 = unlimited
    fmt = req.get("format")
    if fmt == "json":
        out["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        out["response_format"] = {"type": "json_schema", "json_schema": {"schema": fmt}}
    return out


def _messages(req: dict[str, Any]) -> list[dict[str, Any]]:
    msgs = req.get("messages")
    if msgs is None:
        return []
    if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
        raise ApiError(400, "`messages` must be a list of objects", "invalid_request")
    out = []
    for m in msgs:
        msg = {"role": m.get("role", "user"), "content": m.get("content", "")}
        if m.get("images"):
            msg["content"] = [{"type": "text", "text": msg["content"]}] + [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{img}"}}
                for img in m["images"]
            ]
        if m.get("tool_calls"):
            msg["tool_calls"] = m["tool_calls"]
        out.append(msg)
    return out


def chat_request(req: dict[str, Any], model: str) -> dict[str, Any]:
    body = {"model": model, "messages": _messages(req), "stream": req.get("stream", True)}
    if req.get("tools"):
        body["tools"] = req["tools"]
    body.update(_options(req))
    if body["stream"]:
        body["stream_options"] = {"include_usage": True}
    return body


def generate_request(req: dict[str, Any], model: str) -> tuple[str, dict[str, Any]]:
    """(path, body): raw prompts go to /v1/completions, the rest through the chat template."""
    prompt = req.get("prompt", "")
    if not isinstance(prompt, str):
        raise ApiError(400, "`prompt` must be a string", "invalid_request")
    stream = req.get("stream", True)
    if req.get("raw"):
        body = {"model": model, "prompt": prompt, "stream": stream}
        path = "/v1/completions"
    else:
        msgs = [{"role": "system", "content": req["system"]}] if req.get("system") else []
        msgs.append({"role": "user", "content": prompt})
        body = {"model": model, "messages": msgs, "stream": stream}
        path = "/v1/chat/completions"
    body.update(_options(req))
    if stream:
        body["stream_options"] = {"include_usage": True}
    return path, body


def _done_fields(usage: dict | None, started: float, reason: str | None) -> dict[str, Any]:
    usage = usage or {}
    total = int((time.monotonic() - started) * 1e9)
    return {
        "done": True,
        "done_reason": reason or "stop",
        "total_duration": total,
        "load_duration": 0,
        "prompt_eval_count": usage.get("prompt_tokens", 0),
        "eval_count": usage.get("completion_tokens", 0),
        "eval_duration": total,
    }


def chat_response(model: str, data: dict[str, Any], started: float) -> dict[str, Any]:
    """A whole (non-streamed) OpenAI chat completion -> one Ollama chat or generate reply."""
    choice = (data.get("choices") or [{}])[0]
    msg = choice.get("message") or {}
    text = msg.get("content") if "message" in choice else choice.get("text", "")
    out = {
        "model": model,
        "created_at": now_iso(),
        "message": {"role": "assistant", "content": text or ""},
        **_done_fields(data.get("usage"), started, choice.get("finish_reason")),
    }
    if msg.get("tool_calls"):
        out["message"]["tool_calls"] = [_tool_call(t) for t in msg["tool_calls"]]
    return out


def _tool_call(t: dict[str, Any]) -> dict[str, Any]:
    fn = t.get("function") or {}
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            args = msgspec.json.decode(args)
        except msgspec.DecodeError:
            pass
    return {"function": {"name": fn.get("name", ""), "arguments": args}}


def as_generate(reply: dict[str, Any]) -> dict[str, Any]:
    """A chat-shaped line -> the /api/generate shape (`response` instead of `message`)."""
    reply = dict(reply)
    msg = reply.pop("message", {}) or {}
    reply["response"] = msg.get("content", "")
    return reply


async def sse_to_ndjson(
    lines: AsyncIterator[str], model: str, started: float, generate: bool
) -> AsyncIterator[bytes]:
    """OpenAI server-sent events -> Ollama NDJSON lines, one per token as it arrives."""
    usage: dict | None = None
    reason: str | None = None
    async for line in lines:
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            break
        try:
            chunk = msgspec.json.decode(payload)
        except msgspec.DecodeError:
            continue
        if chunk.get("error"):
            err = chunk["error"]
            yield msgspec.json.encode({"error": err.get("message", str(err))}) + b"\n"
            return
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices") or []:
            reason = choice.get("finish_reason") or reason
            delta = choice.get("delta") or {}
            text = delta.get("content") if "delta" in choice else choice.get("text")
            if not text and not delta.get("tool_calls"):
                continue
            piece: dict[str, Any] = {
                "model": model,
                "created_at": now_iso(),
                "message": {"role": "assistant", "content": text or ""},
                "done": False,
            }
            if delta.get("tool_calls"):
                piece["message"]["tool_calls"] = [_tool_call(t) for t in delta["tool_calls"]]
            yield msgspec.json.encode(as_generate(piece) if generate else piece) + b"\n"
    last: dict[str, Any] = {
        "model": model,
        "created_at": now_iso(),
        "message": {"role": "assistant", "content": ""},
        **_done_fields(usage, started, reason),
    }
    yield msgspec.json.encode(as_generate(last) if generate else last) + b"\n"


def embed_request(req: dict[str, Any], model: str, legacy: bool) -> dict[str, Any]:
    value = req.get("prompt") if legacy else req.get("input")
    if isinstance(value, str):
        inputs: list[str] = [value]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        inputs = value
    else:
        field = "prompt" if legacy else "input"
        raise ApiError(400, f"`{field}` must be a string or a list of strings", "invalid_request")
    return {"model": model, "input": inputs}


def embed_response(model: str, data: dict[str, Any], legacy: bool) -> dict[str, Any]:
    vectors = [d["embedding"] for d in sorted(data.get("data", []), key=lambda d: d["index"])]
    if legacy:
        return {"embedding": vectors[0] if vectors else []}
    usage = data.get("usage") or {}
    return {
        "model": model,
        "embeddings": vectors,
        "prompt_eval_count": usage.get("prompt_tokens", 0),
    }


def model_entry(name: str, size: int, family: str = "llama") -> dict[str, Any]:
    return {
        "name": name,
        "model": name,
        "modified_at": now_iso(),
        "size": size,
        "digest": "",
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": family,
            "families": [family],
            "parameter_size": "",
            "quantization_level": "",
        },
    }


def parameter_size(n: int) -> str:
    """Ollama's short form of a parameter count: 8.0B, 137M, 117K."""
    if n >= 1_000_000_000:
        return f"{n / 1e9:.1f}B"
    if n >= 1_000_000:
        return f"{n / 1e6:.0f}M"
    return f"{n / 1e3:.0f}K" if n >= 1000 else str(n)


def quantization_level(file_type: int | None) -> str:
    """The GGUF file type as Ollama names it (MOSTLY_Q4_K_M -> Q4_K_M)."""
    from gguf import LlamaFileType  # numpy comes with it: only loaded when asked

    if file_type is None:
        return ""
    try:
        name = LlamaFileType(file_type).name
    except ValueError:
        return str(file_type)
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def model_facts(s: GgufSummary) -> tuple[dict[str, Any], dict[str, Any]]:
    """(details, model_info) of /api/show from a GGUF header summary."""
    a = s.architecture
    details = {
        "family": a,
        "families": [a],
        "parameter_size": parameter_size(s.n_params) if s.n_params else "",
        "quantization_level": quantization_level(s.file_type),
    }
    info: dict[str, Any] = {
        "general.architecture": a,
        "general.file_type": s.file_type,
        f"{a}.block_count": s.n_layers,
        f"{a}.context_length": s.n_ctx_train,
        f"{a}.embedding_length": s.n_embd,
        f"{a}.attention.head_count": s.n_head,
        f"{a}.attention.head_count_kv": s.n_head_kv,
    }
    if s.n_params:
        info["general.parameter_count"] = s.n_params
    if s.n_vocab:
        info[f"{a}.vocab_size"] = s.n_vocab
    return details, info
