"""The APIs clients now speak, through the gateway to a real llama-server: Anthropic's
messages (official `anthropic` client), OpenAI's responses (official `openai` client), and
llama-server's rerank and infill. Errors must come back in each API's own shape, with the
status the client maps to the right exception class."""

from __future__ import annotations

import random

import anthropic
import httpx
import openai
import pytest

from stack import Stack

KEY = "test-key-123456"
ADMIN = "admin-key-123456"

# The tiny model has no FIM tokens and no ranking head. FIM token ids given on the command
# line (three byte tokens) make /infill work; `--reranking` gives it rank pooling (llama.cpp
# reads the last hidden state when the GGUF has no classifier). Noise, but real answers.
FIM = [
    "--override-kv",  # one flag, comma-separated (llama-server keeps only the last of several)
    "tokenizer.ggml.fim_pre_token_id=int:3,tokenizer.ggml.fim_suf_token_id=int:4,"
    "tokenizer.ggml.fim_mid_token_id=int:5",
]

# llama-server (this build) sends Anthropic's `message_start` only with the first token, and
# holds back a token that is part of a UTF-8 character: a stream whose first token is one
# (the tiny model's noise is full of lone bytes; emoji or CJK from a real model) has no
# `message_start`, and the anthropic client's stream helper fails. The byte tokens 0x80-0xFF
# (ids 131-258) are biased away so every token is a whole character. (The flag is given
# once per token: llama-server warns that repeats are deprecated but applies them all.)
ASCII_ONLY = [arg for i in range(131, 259) for arg in ("--logit-bias", f"{i}-100")]


@pytest.fixture
def stack(tmp_path, nats_url, llama_server_bin, tiny_gguf):
    models = {
        "tiny": {
            "url": f"file://{tiny_gguf(4)}",
            "ctx_size": 1024,
            "aliases": ["tiny:latest"],
            "args": ASCII_ONLY,
        },
        "ranker": {"url": f"file://{tiny_gguf(6)}", "ctx_size": 512, "args": ["--reranking"]},
        "coder": {"url": f"file://{tiny_gguf(7)}", "ctx_size": 512, "args": FIM + ASCII_ONLY},
        "scoped": {"url": f"file://{tiny_gguf(4)}", "ctx_size": 512},
        # its file does not exist: every request for it fails, the way a broken model does
        "broken": {"url": f"file://{tmp_path}/missing.gguf", "ctx_size": 512},
    }
    gateway = {
        "api_keys": [
            {"key": KEY, "models": ["tiny", "ranker", "coder", "broken"]},
            {"key": ADMIN, "admin": True},
        ],
    }
    s = Stack(tmp_path, nats_url, models)
    s.patch_config(gateway=gateway)
    s.start()
    yield s
    s.stop()


SEEDED = {"seed": 11}  # the same noise on every run
HI = [{"role": "user", "content": "hello world"}]


def claude(stack: Stack, key: str | None = KEY) -> anthropic.Anthropic:
    """The official client as a user would point it at us (its key goes as x-api-key)."""
    return anthropic.Anthropic(api_key=key, base_url=stack.base, max_retries=0, timeout=60)


def test_anthropic_client_messages_stream_count_tokens(stack):
    c = claude(stack)
    m = c.messages.create(model="tiny", max_tokens=6, messages=HI, extra_body=SEEDED)
    assert m.type == "message" and m.role == "assistant" and m.model == "tiny"
    assert m.content[0].type == "text" and m.stop_reason in ("max_tokens", "end_turn")
    assert m.usage.input_tokens > 0 and 0 < m.usage.output_tokens <= 6

    with c.messages.stream(
        model="tiny:latest", max_tokens=8, messages=HI, system="be brief", extra_body=SEEDED
    ) as s:
        texts = list(s.text_stream)
        final = s.get_final_message()
    assert len(texts) >= 2 and final.stop_reason in ("max_tokens", "end_turn")
    assert 0 < final.usage.output_tokens <= 8

    # Streamed to a cold model: the gateway's SSE comments while it starts, then its events.
    with c.messages.stream(model="coder", max_tokens=4, messages=HI, extra_body=SEEDED) as s:
        assert s.get_final_message().usage.output_tokens <= 4

    counted = c.messages.count_tokens(model="tiny", messages=HI)
    assert counted.input_tokens == m.usage.input_tokens

    listed = {m.id for m in c.models.list()}
    assert {"tiny", "ranker"} <= listed and "scoped" not in listed


def test_anthropic_errors_are_anthropic_shaped(stack):
    c = claude(stack)
    with pytest.raises(anthropic.NotFoundError) as nf:  # (a scoped key would get a 403)
        claude(stack, ADMIN).messages.create(model="nope", max_tokens=4, messages=HI)
    assert nf.value.body["type"] == "error"
    assert nf.value.body["error"]["type"] == "not_found_error"
    assert "nope" in nf.value.body["error"]["message"]

    with pytest.raises(anthropic.AuthenticationError) as unauth:
        claude(stack, key="wrong-key").messages.create(model="tiny", max_tokens=4, messages=HI)
    assert unauth.value.body["error"]["type"] == "authentication_error"

    with pytest.raises(anthropic.PermissionDeniedError) as denied:
        c.messages.count_tokens(model="scoped", messages=HI)
    assert denied.value.body["error"]["type"] == "permission_error"

    # llama-server refuses the body (content of the wrong type): its message, our shape
    wrong = [{"role": "user", "content": 5}]
    with pytest.raises(anthropic.BadRequestError) as bad:
        c.messages.create(model="tiny", max_tokens=4, messages=wrong)  # type: ignore[list-item]
    assert bad.value.body["error"]["type"] == "invalid_request_error"
    assert "content" in bad.value.body["error"]["message"]

    # A model that cannot start: a 503 (Retry-After) when asked plainly...
    r = httpx.post(
        f"{stack.base}/v1/messages",
        headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"},
        json={"model": "broken", "max_tokens": 4, "messages": HI},
        timeout=60,
    )
    assert r.status_code == 503 and "retry-after" in r.headers, r.text
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "overloaded_error"
    # ...and, streamed, an `event: error` after the 200 head, which the client raises.
    with pytest.raises(anthropic.APIStatusError) as failed:
        with c.messages.stream(model="broken", max_tokens=4, messages=HI) as s:
            list(s.text_stream)
    assert failed.value.body["error"]["type"] == "overloaded_error"

    # The same failures on OpenAI routes keep OpenAI's shape.
    r = httpx.post(
        f"{stack.base}/v1/responses",
        headers={"Authorization": f"Bearer {ADMIN}"},
        json={"model": "nope", "input": "hi"},
        timeout=30,
    )
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_openai_responses_plain_and_streamed(stack):
    c = openai.OpenAI(api_key=KEY, base_url=f"{stack.base}/v1", max_retries=0, timeout=60)
    r = c.responses.create(model="tiny", input="hello world", max_output_tokens=6)
    assert r.object == "response" and r.status == "completed" and r.model == "tiny"
    assert r.output[0].type == "message" and isinstance(r.output_text, str)
    assert r.usage is not None and r.usage.output_tokens <= 6

    events = list(
        c.responses.create(model="tiny", input="hello world", max_output_tokens=8, stream=True)
    )
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed", kinds
    assert kinds.count("response.output_text.delta") >= 2

    counted = httpx.post(
        f"{stack.base}/v1/responses/input_tokens",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"model": "tiny", "input": "hello world"},
        timeout=30,
    )
    assert counted.status_code == 200 and counted.json()["input_tokens"] > 0

    with pytest.raises(openai.NotFoundError):
        c.with_options(api_key=ADMIN).responses.create(model="nope", input="hi")


def test_rerank_and_infill(stack):
    h = {"Authorization": f"Bearer {KEY}"}
    docs = ["hello world", "the model", "a"]
    with httpx.Client(base_url=stack.base, headers=h, timeout=60) as c:
        for path in ("/v1/rerank", "/rerank", "/v1/reranking"):
            r = c.post(path, json={"model": "ranker", "query": "hello", "documents": docs})
            assert r.status_code == 200, (path, r.text)
            results = r.json()["results"]
            assert sorted(x["index"] for x in results) == [0, 1, 2]
            assert all(isinstance(x["relevance_score"], float) for x in results)

        fim = {"input_prefix": "the ", "input_suffix": " world", "n_predict": 4} | SEEDED
        r = c.post("/infill", json={"model": "coder"} | fim)
        assert r.status_code == 200, r.text
        assert r.json()["tokens_predicted"] <= 4 and isinstance(r.json()["content"], str)

        streamed = c.post("/infill", json={"model": "coder", "stream": True} | fim)
        assert streamed.status_code == 200
        assert streamed.text.count("data: ") >= 2, streamed.text

        # A model started without the feature: llama-server's 501 ("not supported") comes
        # back as the client's 400 with its message and a hint, never as a 500 of ours.
        r = c.post("/v1/rerank", json={"model": "tiny", "query": "hello", "documents": docs})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "not_supported" and "reranking" in err["message"]
        assert "models.tiny.args" in err["message"]
        r = c.post("/infill", json={"model": "tiny"} | fim)
        assert r.status_code == 400, r.text
        assert "Infill is not supported" in r.json()["error"]["message"]


def test_new_routes_answer_bad_requests_in_their_own_shape(stack):
    rnd = random.Random(12)
    paths = [
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/v1/responses",
        "/v1/responses/input_tokens",
        "/v1/rerank",
        "/infill",
    ]
    bodies = [
        b"",
        b"{",
        b"[]",
        b'{"model": 1}',
        b'{"model": "nope"}',
        b'{"model": "tiny", "messages": [{"role": "user", "content": 5}], "max_tokens": 2}',
        b'{"model": "tiny", "input": 5, "max_output_tokens": 2}',
        b'{"model": "ranker", "query": 5, "documents": "x"}',
        b'{"model": "coder", "input_prefix": 5}',
    ]
    bodies += [bytes(rnd.getrandbits(8) for _ in range(rnd.randint(1, 100))) for _ in range(5)]
    with httpx.Client(base_url=stack.base, headers={"x-api-key": KEY}, timeout=30) as c:
        for path in paths:
            for body in bodies:
                r = c.post(path, content=body, headers={"content-type": "application/json"})
                assert r.status_code < 500, (path, body[:40], r.status_code, r.text[:200])
                if r.status_code < 400:
                    continue
                if path.startswith("/v1/messages"):  # Anthropic's shape
                    err = r.json()
                    assert err["type"] == "error" and err["error"]["message"], r.text
                    assert err["error"]["type"].endswith("_error"), r.text
                else:
                    assert set(r.json()["error"]) >= {"message", "type", "code"}, r.text
