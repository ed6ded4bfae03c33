"""The chat template a model runs with, for Ollama's /api/show `template`: the configured one
(a built-in name or Jinja text, lls/chat_templates.py), else what a ready instance's
llama-server reports in GET /props (the GGUF's own, or its ChatML fallback), else ""."""

from __future__ import annotations

import asyncio
import logging

import msgspec

from lls.config import ModelConfig

from .proxy import Upstream, upstream_headers

log = logging.getLogger(__name__)

PROPS_TIMEOUT_S = 2.0  # /api/show answers without it rather than wait on a busy instance


def props_template(body: bytes) -> str:
    """`chat_template` of a /props answer; "" when it has none or is not JSON."""
    try:
        props = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return ""
    value = props.get("chat_template") if isinstance(props, dict) else None
    return value if isinstance(value, str) else ""


async def template_in_use(model: str, m: ModelConfig, upstream: Upstream) -> str:
    if m.chat_template:
        return m.chat_template
    rec = upstream.router.pick(model)
    if rec is None or not rec.endpoint:
        return ""
    key = upstream.router.key_for(rec)
    try:
        async with asyncio.timeout(PROPS_TIMEOUT_S):
            reply = await upstream.client.send(
                "GET", f"{rec.endpoint}/props", b"", upstream_headers({}, key)
            )
            try:
                body = await reply.aread()
            finally:
                await reply.aclose()
    except Exception as e:  # noqa: BLE001 - no template is an answer too (gone, busy, slow)
        log.debug("no /props from %s: %r", rec.instance_id, e)
        return ""
    return props_template(body) if reply.status_code == 200 else ""
