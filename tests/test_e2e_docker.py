"""End to end on real parts, Docker runtime: the agent runs llama-server in a container
(a local image built from the cached binary, since no registry is reachable here)."""

from __future__ import annotations

import uuid

import pytest
from openai import OpenAI

from stack import Stack


@pytest.fixture
def docker_stack(tmp_path, nats_url, llama_server_bin, tiny_gguf, docker_client):
    host = f"dock-{uuid.uuid4().hex[:6]}"
    # a random tiny model may sample EOS at once: the token counts below need every token
    tiny = {"url": f"file://{tiny_gguf(3)}", "ctx_size": 1024, "defaults": {"ignore_eos": True}}
    models = {"tiny": tiny}
    s = Stack(tmp_path, nats_url, models, agent__runtime="docker", agent__host_id=host)
    s.start()
    yield s, host
    s.stop()
    left = docker_client.containers.list(all=True, filters={"label": f"lls.host={host}"})
    for c in left:
        c.remove(force=True)
    assert left == [], "containers left behind after the stack stopped"


def test_openai_sdk_through_a_docker_instance(docker_stack, docker_client):
    stack, host = docker_stack
    c = OpenAI(base_url=f"{stack.base}/v1", api_key="unused", max_retries=0, timeout=120)
    r = c.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=6
    )
    assert r.usage is not None and r.usage.completion_tokens == 6

    chunks = list(
        c.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=12,
            stream=True,
            temperature=0,  # greedy: a random tiny model sampled at random may emit no text
        )
    )
    texts = [ch.choices[0].delta.content for ch in chunks if ch.choices]
    assert sum(1 for t in texts if t) >= 2, chunks

    running = docker_client.containers.list(filters={"label": f"lls.host={host}"})
    assert len(running) == 1
    assert running[0].labels["lls.model"] == "tiny"
