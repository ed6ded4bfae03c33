"""Per-key limits and token counts on a real stack: 429s with Retry-After past a key's
requests, tokens or concurrency; tokens counted per key name in /metrics (never the
secret), and `lls usage` printing them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import ollama
import pytest

from conftest import ROOT
from stack import Stack

RPM = "sk-rpm-0123456789"
TPM = "sk-tpm-0123456789"
SOLO = "sk-solo-0123456789"
TEAM = "sk-team-0123456789"
UNNAMED = "sk-unnamed-0123456789"
ADMIN = "sk-admin-0123456789"
SECRETS = (RPM, TPM, SOLO, TEAM, UNNAMED, ADMIN)


@pytest.fixture
def stack(tmp_path, nats_url, llama_server_bin, tiny_gguf):
    models = {
        "tiny": {
            "url": f"file://{tiny_gguf(4)}",
            "ctx_size": 1024,
            "args": ["--context-shift"],  # lets one request run as long as a test needs
        }
    }
    keys = [
        {"key": RPM, "name": "rpm-team", "requests_per_minute": 2},
        {"key": TPM, "name": "tpm-team", "tokens_per_minute": 30},
        {"key": SOLO, "name": "solo", "max_concurrent": 1},
        {"key": TEAM, "name": "team-a"},
        {"key": UNNAMED},
        {"key": ADMIN, "name": "ops", "admin": True},
    ]
    s = Stack(tmp_path, nats_url, models)
    s.patch_config(gateway={"api_keys": keys})
    s.start()
    yield s
    s.stop()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def complete(stack: Stack, key: str, max_tokens: int = 4, **extra: object) -> httpx.Response:
    body = {"model": "tiny", "prompt": "a", "max_tokens": max_tokens, "ignore_eos": True}
    return httpx.post(
        f"{stack.base}/v1/completions", headers=auth(key), json={**body, **extra}, timeout=60
    )


def assert_rate_limited(r: httpx.Response, limit: str, most_s: int) -> None:
    assert r.status_code == 429, r.text
    assert 1 <= int(r.headers["retry-after"]) <= most_s
    err = r.json()["error"]
    assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded"
    assert limit in err["message"]


def test_key_limits_answer_429_with_retry_after(stack):
    assert complete(stack, RPM).status_code == 200  # the first one waits for a cold start
    assert complete(stack, RPM).status_code == 200
    t0 = time.monotonic()
    r = complete(stack, RPM)
    assert_rate_limited(r, "requests_per_minute", 60)
    assert time.monotonic() - t0 < 2, "a refusal is immediate"
    # the limit is per key: another key is served meanwhile
    assert complete(stack, TEAM).status_code == 200

    # Tokens are counted after the answer: one answer over the budget blocks the next ones.
    assert complete(stack, TPM, max_tokens=40).status_code == 200
    assert_rate_limited(complete(stack, TPM), "tokens_per_minute", 60)

    # One running request is all the solo key may have; the slot frees when it ends.
    endless = {"model": "tiny", "prompt": "a", "max_tokens": 10**6, "ignore_eos": True}
    with httpx.stream(
        "POST",
        f"{stack.base}/v1/completions",
        headers=auth(SOLO),
        json={**endless, "stream": True},
        timeout=60,
    ) as running:
        chunks = running.iter_raw()  # kept: a dropped iterator closes the stream
        next(chunks)
        assert_rate_limited(complete(stack, SOLO), "max_concurrent", 60)
    deadline = time.monotonic() + 20
    while (r := complete(stack, SOLO)).status_code == 429 and time.monotonic() < deadline:
        time.sleep(0.2)  # the gateway sees the walk-away at its next write
    assert r.status_code == 200, r.text

    m = httpx.get(f"{stack.base}/metrics", headers=auth(ADMIN)).text
    assert 'lls_key_requests_total{code="429",key="rpm-team",model="tiny"} 1.0' in m
    assert 'lls_key_requests_total{code="200",key="rpm-team",model="tiny"} 2.0' in m
    assert 'lls_key_limited_total{key="tpm-team",limit="tokens_per_minute"} 1.0' in m
    assert 'lls_key_limited_total{key="solo",limit="max_concurrent"}' in m


def last_event(sse: str) -> dict:
    events = [line[5:].strip() for line in sse.splitlines() if line.startswith("data:")]
    return json.loads([e for e in events if e != "[DONE]"][-1])


def lls_usage(stack: Stack, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lls.cli", "--config", str(stack.config), "usage", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LLS_API_KEY": ADMIN},
    )


def test_tokens_are_counted_per_key_name_and_lls_usage_prints_them(stack):
    prompt = completion = 0
    r = complete(stack, TEAM, max_tokens=6)  # a whole answer: its usage
    assert r.status_code == 200
    prompt += r.json()["usage"]["prompt_tokens"]
    completion += r.json()["usage"]["completion_tokens"]
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    r = httpx.post(  # a stream without include_usage: the timings of its last chunk
        f"{stack.base}/v1/chat/completions",
        headers=auth(TEAM),
        json={**chat, "max_tokens": 5, "ignore_eos": True},
        timeout=60,
    )
    assert r.status_code == 200
    timings = last_event(r.text)["timings"]
    prompt += timings["prompt_n"] + timings.get("cache_n", 0)
    completion += timings["predicted_n"]
    c = ollama.Client(host=stack.base, headers=auth(TEAM))  # Ollama's route, streamed
    parts = list(
        c.chat(
            model="tiny",
            messages=[{"role": "user", "content": "hello"}],
            stream=True,
            options={"num_predict": 7, "seed": 11},
        )
    )
    prompt += parts[-1].prompt_eval_count or 0
    completion += parts[-1].eval_count or 0
    assert completion >= 6 + 5 + 1
    assert complete(stack, UNNAMED).status_code == 200

    m = httpx.get(f"{stack.base}/metrics", headers=auth(ADMIN)).text
    assert f'lls_tokens_total{{key="team-a",kind="prompt",model="tiny"}} {prompt:.1f}' in m
    assert f'lls_tokens_total{{key="team-a",kind="completion",model="tiny"}} {completion:.1f}' in m
    assert 'lls_key_requests_total{code="200",key="team-a",model="tiny"} 3.0' in m
    unnamed = [line for line in m.splitlines() if line.startswith("lls_key_requests_total{")]
    assert any('key="key-' in line for line in unnamed), unnamed  # a hash label, not the key
    assert not any(secret in m for secret in SECRETS)
    assert not any(secret[3:] in m for secret in SECRETS)  # not even in part

    out = lls_usage(stack)
    assert out.returncode == 0, out.stderr
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in out.stdout.splitlines()}
    assert rows[("KEY", "MODEL")] == ["REQUESTS", "REFUSED", "PROMPT_TOKENS", "COMPLETION_TOKENS"]
    assert rows[("team-a", "tiny")] == ["3", "0", str(prompt), str(completion)]
    assert not any(secret in out.stdout for secret in SECRETS)

    bad = lls_usage(stack, "--key", "sk-not-a-key-0000")
    assert bad.returncode == 1 and "admin key" in bad.stderr
