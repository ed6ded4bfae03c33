"""Embedding inputs longer than the model can take are truncated, not refused with a 500.

llama-server embeds one input in one physical batch (`-ub`, at most `-c`); a longer input
fails. Like the seed, we cut such inputs to the limit with the instance's own tokenizer
(`/tokenize`) and send the kept tokens. Inputs whose UTF-8 length is within the limit cannot
have more tokens than bytes, so they pass untouched with no extra round trip.
"""

from __future__ import annotations

from typing import Any

import msgspec

from lls.config import ModelConfig

from .http import Client

DEFAULT_UBATCH = 512  # llama-server's default physical batch size


def token_limit(m: ModelConfig) -> int:
    """Tokens one input may have: the physical batch size, capped by the context."""
    ubatch = DEFAULT_UBATCH
    for flag in ("-ub", "--ubatch-size"):
        if flag in m.args:
            i = m.args.index(flag)
            if i + 1 < len(m.args) and m.args[i + 1].isdigit():
                ubatch = int(m.args[i + 1])
    return min(ubatch, m.ctx_size) if m.ctx_size else ubatch


def needs_cut(inputs: list[Any], limit: int) -> bool:
    return any(isinstance(x, str) and len(x.encode()) > limit for x in inputs)


async def truncate(
    client: Client, endpoint: str, body: bytes, limit: int, headers: dict[str, str] | None = None
) -> bytes:
    """`body` with each over-long string input replaced by its first `limit` tokens."""
    data = msgspec.json.decode(body)
    value = data.get("input") if isinstance(data, dict) else None
    inputs = [value] if isinstance(value, str) else value
    if not isinstance(inputs, list) or not needs_cut(inputs, limit):
        return body
    out: list[Any] = []
    for x in inputs:
        if isinstance(x, str) and len(x.encode()) > limit:
            reply = await client.post_json(
                f"{endpoint}/tokenize",
                {"content": x, "add_special": True},
                timeout=30,
                headers=headers,
            )
            tokens = reply["tokens"]  # type: ignore[index]
            out.append(tokens[:limit] if len(tokens) > limit else x)
        else:
            out.append(x)
    data["input"] = out
    return msgspec.json.encode(data)
