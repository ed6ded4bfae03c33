"""The Ollama API on top of llama-server's OpenAI API, so the `ollama` client works unchanged.

Pure translations (request -> OpenAI body, OpenAI chunk -> Ollama line) are kept apart from
the streaming glue, and are tested directly.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from proto import GgufSummary

from .edge import decode_body
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


# ---------------------------------------------------------------- request bodies
# One msgspec Struct per Ollama body: every field we read is checked by type at decode time,
# so a wrong type is a 400 naming the field, never an exception later or an upstream 500.
# Fields we do not use are ignored (as Ollama ignores what it does not know).

Role = Literal["system", "user", "assistant", "tool"]
Model = Annotated[str, msgspec.Meta(min_length=1, max_length=512)]


class Options(msgspec.Struct):
    num_predict: int | None = None
    stop: str | list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    typical_p: float | None = None


class ToolFunctionCall(msgspec.Struct):
    name: str
    arguments: dict[str, Any] | str = {}


class ToolCall(msgspec.Struct):
    function: ToolFunctionCall


class Message(msgspec.Struct):
    role: Role = "user"
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None


class FunctionSpec(msgspec.Struct):
    name: str
    description: str = ""
    parameters: dict[str, Any] = {}


class Tool(msgspec.Struct):
    function: FunctionSpec
    type: Literal["function"] = "function"


Format = Literal["json", ""] | dict[str, Any] | None


class ChatRequest(msgspec.Struct):
    model: Model
    messages: list[Message] = []
    stream: bool = True
    format: Format = None
    options: Options | None = None
    tools: list[Tool] | None = None
    keep_alive: int | float | str | None = None
    think: bool | str | None = None


class GenerateRequest(msgspec.Struct):
    model: Model
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    stream: bool = True
    format: Format = None
    options: Options | None = None
    images: list[str] | None = None
    keep_alive: int | float | str | None = None
    think: bool | str | None = None


class EmbedRequest(msgspec.Struct):
    model: Model
    input: str | list[str] | None = None  # /api/embed
    prompt: str | None = None  # /api/embeddings (the older API)
    truncate: bool = True
    options: Options | None = None
    keep_alive: int | float | str | None = None


class ShowRequest(msgspec.Struct):
    model: str = ""
    name: str = ""  # older clients send `name`
    verbose: bool = False


class PullRequest(msgspec.Struct):
    model: str = ""
    name: str = ""  # older clients send `name`
    insecure: bool = False  # registries' TLS: nothing to us (models come from their config url)
    stream: bool = True


class DeleteRequest(msgspec.Struct):
    model: str = ""
    name: str = ""  # older clients send `name`


Body = ChatRequest | GenerateRequest | EmbedRequest | ShowRequest | PullRequest | DeleteRequest
B = TypeVar(
    "B", ChatRequest, GenerateRequest, EmbedRequest, ShowRequest, PullRequest, DeleteRequest
)
_DECODERS: dict[type, msgspec.json.Decoder] = {}


def parse_body(body: bytes, kind: type[B]) -> B:
    """Decode and type-check an Ollama request body; any problem is a 400 saying what."""
    decoder = _DECODERS.get(kind) or _DECODERS.setdefault(kind, msgspec.json.Decoder(kind))
    req = decode_body(decoder, body)
    if isinstance(req, ShowRequest | PullRequest | DeleteRequest) and not (req.model or req.name):
        raise ApiError(400, "missing required field `model`", "missing_model")
    for img in _all_images(req):
        if not _BASE64.fullmatch(img):
            raise ApiError(400, "`images` must be base64-encoded strings", "invalid_request")
    return req


_BASE64 = re.compile(r"[A-Za-z0-9+/\r\n]*={0,2}")


def _all_images(req: Body) -> list[str]:
    if isinstance(req, GenerateRequest):
        return req.images or []
    if isinstance(req, ChatRequest):
        return [img for m in req.messages for img in m.images or []]
    return []


def _options(req: ChatRequest | GenerateRequest) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if req.options is not None:
        for k, v in msgspec.structs.asdict(req.options).items():
            if v is not None:
                out[OPTION_NAMES[k]] = v
    if out.get("max_tokens") is not None and out["max_tokens"] < 0:
        del out["max_tokens"]  # Ollama's -1 = unlimited
    fmt = req.format
    if fmt == "json":
        out["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        out["response_format"] = {"type": "json_schema", "json_schema": {"schema": fmt}}
    return out


def _content(text: str, images: list[str] | None) -> str | list[dict[str, Any]]:
    if not images:
        return text
    return [{"type": "text", "text": text}] + [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{img}"}}
        for img in images
    ]


def _messages(req: ChatRequest) -> list[dict[str, Any]]:
    out = []
    for m in req.messages:
        msg: dict[str, Any] = {"role": m.role, "content": _content(m.content, m.images)}
        if m.tool_calls:
            msg["tool_calls"] = [
                {
                    "type": "function",
                    "function": {
                        "name": t.function.name,
                        "arguments": t.function.arguments
                        if isinstance(t.function.arguments, str)
                        else msgspec.json.encode(t.function.arguments).decode(),
                    },
                }
                for t in m.tool_calls
            ]
        out.append(msg)
    return out


def chat_request(req: ChatRequest, model: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": _messages(req), "stream": req.stream}
    if req.tools:
        body["tools"] = [msgspec.to_builtins(t) for t in req.tools]
    body.update(_options(req))
    if body["stream"]:
        body["stream_options"] = {"include_usage": True}
    return body


def generate_request(req: GenerateRequest, model: str) -> tuple[str, dict[str, Any]]:
    """(path, body): raw prompts go to /v1/completions, the rest through the chat template."""
    body: dict[str, Any]
    if req.raw:
        body = {"model": model, "prompt": req.prompt, "stream": req.stream}
        path = "/v1/completions"
    else:
        msgs: list[dict[str, Any]] = []
        if req.system:
            msgs.append({"role": "system", "content": req.system})
        msgs.append({"role": "user", "content": _content(req.prompt, req.images)})
        body = {"model": model, "messages": msgs, "stream": req.stream}
        path = "/v1/chat/completions"
    body.update(_options(req))
    if req.stream:
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


def embed_request(req: EmbedRequest, model: str, legacy: bool) -> dict[str, Any]:
    value = req.prompt if legacy else req.input
    if isinstance(value, str):
        inputs: list[str] = [value]
    elif isinstance(value, list):
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


# ---------------------------------------------------------------- /api/pull lines
# What `ollama pull` prints: a status per step, and a progress bar per digest (keyed by it).
PULL_START = "pulling manifest"
PULL_END = ("verifying sha256 digest", "writing manifest", "success")


def pull_digest(filename: str, sha256: str | None) -> str:
    """The `digest` a pull's progress lines carry: the configured checksum, else the store
    file's name (there is no registry blob to name)."""
    return f"sha256:{sha256.lower()}" if sha256 else filename


def pull_progress(digest: str, completed: int, total: int | None) -> dict[str, Any]:
    name = digest.removeprefix("sha256:")[:12] if digest.startswith("sha256:") else digest
    line: dict[str, Any] = {"status": f"pulling {name}", "digest": digest, "completed": completed}
    if total is not None:
        line["total"] = total
    return line


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


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive_seconds(value: int | float | str | None) -> float | None:
    """Ollama's `keep_alive` in seconds: a number of seconds, or a Go duration ("5m",
    "1h30m", "-1"). 0 unloads the model after the answer; a negative value keeps it loaded.
    None when the request did not set it (the model's idle_timeout applies)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    parts = _DURATION_PART.findall(body)
    if not body or "".join(n + u for n, u in parts) != body:
        raise ApiError(
            400,
            f"keep_alive {value!r} is not a duration: use seconds or e.g. '5m', '1h', '-1'",
            "invalid_keep_alive",
        )
    return sign * sum(float(n) * _UNIT_S[u] for n, u in parts)
