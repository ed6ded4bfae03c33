"""The gateway's edge on a real stack (NATS, llama-server, tiny GGUFs, real sockets): hostile
and malformed requests get a quick 4xx with a JSON error in the route's style and break
nothing; keys are checked before bodies and hide what they may not use; slow and idle
sockets cannot exhaust the gateway; a silent bus refuses cold requests fast."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import proto
from conftest import ROOT, NatsServer
from stack import Cluster, Stack

KEY = "edge-user-key-1"  # scoped to tiny and emb
ADMIN = "edge-admin-key-1"
TRUSTED = "edge-trusted-key-1"  # scoped to slotted; may set id_slot and cache_prompt
OK_CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


class Edge:
    def __init__(self, stack: Stack, nats: NatsServer, tmp: Path):
        self.stack, self.nats, self.tmp = stack, nats, tmp
        self.base = stack.base
        self.port = stack.port


@pytest.fixture(scope="module")
def edge(tmp_path_factory, llama_server_bin, tiny_gguf) -> Iterator[Edge]:
    tmp = tmp_path_factory.mktemp("edge")
    nats = NatsServer(tmp / "nats")
    nats.start()
    env = pytest.MonkeyPatch()
    if getattr(nats, "creds", None) is not None:  # an authenticated bus: its operator identity
        from lls.auth import ENV_CREDS

        env.setenv(ENV_CREDS, str(nats.creds))
    models = {
        "tiny": {"url": f"file://{tiny_gguf(4)}", "ctx_size": 512, "aliases": ["tiny:latest"]},
        "emb": {"url": f"file://{tiny_gguf(5)}", "ctx_size": 512, "embeddings": True},
        "secret-model": {"url": f"file://{tiny_gguf(6)}", "ctx_size": 512, "args": ["-np", "1"]},
        # two slots, started only by test_slot_fields_reach_llama_server_only_from_trusted_keys
        "slotted": {"url": f"file://{tiny_gguf(8)}", "ctx_size": 512, "args": ["-np", "2"]},
    }
    stack = Stack(tmp, nats.url, models)
    stack.patch_config(
        gateway={
            "api_keys": [
                {"key": KEY, "models": ["tiny", "emb"]},
                {"key": ADMIN, "admin": True},
                {"key": TRUSTED, "models": ["slotted"], "trusted": True},
            ]
        },
    )
    try:
        stack.start()
        r = httpx.post(
            f"{stack.base}/v1/chat/completions", json=OK_CHAT, headers=auth(), timeout=60
        )
        assert r.status_code == 200, r.text  # warm: hostile inputs then reach llama-server too
        yield Edge(stack, nats, tmp)
    finally:
        if nats.proc is not None and nats.proc.poll() is None:
            os.kill(nats.proc.pid, signal.SIGCONT)  # in case a test left it frozen
        stack.stop()
        nats.stop()
        env.undo()


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def raw(port: int, data: bytes, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """One request written byte for byte on a real socket; (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        got = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            got += chunk
            head, sep, body = got.partition(b"\r\n\r\n")
            if sep:
                lines = head.split(b"\r\n")
                headers = {
                    k.strip().lower().decode(): v.strip().decode("latin-1")
                    for k, _, v in (line.partition(b":") for line in lines[1:])
                }
                if len(body) >= int(headers.get("content-length", "-1")) >= 0:
                    break
    head, _, body = got.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1]) if lines and lines[0] else 0
    headers = {
        k.strip().lower().decode(): v.strip().decode("latin-1")
        for k, _, v in (line.partition(b":") for line in lines[1:])
    }
    return status, headers, body


def post_raw(port: int, path: str, body: bytes, extra: list[bytes] | None = None) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1".encode(),
        b"Host: 127.0.0.1",
        b"Content-Type: application/json",
        f"Content-Length: {len(body)}".encode(),
        b"Connection: close",
        *(extra or []),
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def hostile_inputs(port: int) -> list[tuple[str, str, bytes, list[bytes]]]:
    """(label, path, body, extra header lines): 100+ requests that must each get a 4xx."""
    key = f"Authorization: Bearer {KEY}".encode()
    cases: list[tuple[str, str, bytes, list[bytes]]] = []

    def add(label: str, path: str, body: object, *extra: bytes, keyed: bool = True) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        cases.append((label, path, data, ([key] if keyed else []) + list(extra)))

    chat, gen, embed, pull = "/api/chat", "/api/generate", "/api/embed", "/api/pull"
    v1 = "/v1/chat/completions"
    # Credentials: non-ASCII, invalid UTF-8, huge, in every place a key is read.
    for where in (v1, chat, "/v1/models", "/api/tags", "/metrics", "/dashboard"):
        add(
            f"non-ascii bearer {where}",
            where,
            OK_CHAT,
            "Authorization: Bearer ключ".encode(),
            keyed=False,
        )
        add(f"latin-1 x-api-key {where}", where, OK_CHAT, b"x-api-key: \xe9\xe8\xff", keyed=False)
        add(
            f"non-ascii cookie {where}",
            where,
            OK_CHAT,
            "Cookie: lls_key=ключ".encode(),
            keyed=False,
        )
    add("non-ascii ?key=", "/v1/models?key=%D0%BA%D0%BB%D1%8E%D1%87", b"", keyed=False)
    add("invalid utf-8 ?key=", "/v1/models?key=%FF%FE", b"", keyed=False)
    add("bearer of 8 KB", v1, OK_CHAT, b"Authorization: Bearer " + b"k" * 8000, keyed=False)
    add("empty bearer", v1, OK_CHAT, b"Authorization: Bearer ", keyed=False)
    add("basic auth", v1, OK_CHAT, b"Authorization: Basic dXNlcjpwYXNz", keyed=False)
    # Bodies that are not JSON objects, or nest absurdly.
    for path in (v1, "/v1/completions", "/v1/embeddings", chat, gen, embed, "/api/show", pull):
        add(f"array body {path}", path, b"[1, 2]")
        add(f"deep nesting {path}", path, b"[" * 100_000 + b"]" * 100_000)
        add(f"invalid utf-8 model {path}", path, b'{"model": "ti\xffny", "prompt": "a"}')
    add("deep value", v1, b'{"model": "tiny", "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}")
    add("deep objects", chat, b'{"model":"tiny","options":' + b'{"a":' * 5000 + b"1" + b"}" * 5001)
    add("string model nul", v1, {"model": "tiny\u0000", "messages": []})
    add("lone surrogate model", v1, b'{"model": "\\ud800", "messages": []}')
    add("lone surrogate ollama", chat, b'{"model": "\\udfff"}')
    add("model object", chat, {"model": {"a": 1}})
    add("model 100 KB", chat, {"model": "m" * 100_000})
    add("number body", gen, b"5")
    add("string body", embed, b'"tiny"')
    add("true body", "/api/show", b"true")
    add("trailing garbage", v1, b'{"model": "tiny"} xx')
    add("NaN", v1, b'{"model": "tiny", "temperature": NaN}')
    # Ollama fields of the wrong type: ours to validate.
    wrong = {
        "options.num_predict str": {"options": {"num_predict": "5"}},
        "options.temperature str": {"options": {"temperature": "hot"}},
        "options.stop int": {"options": {"stop": 5}},
        "options.seed float str": {"options": {"seed": "x"}},
        "options list": {"options": [1]},
        "options str": {"options": "fast"},
        "messages int": {"messages": 5},
        "messages of str": {"messages": ["hi"]},
        "message content int": {"messages": [{"role": "user", "content": 5}]},
        "message content list": {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
        "message role bad": {"messages": [{"role": "wizard", "content": "x"}]},
        "message role int": {"messages": [{"role": 1, "content": "x"}]},
        "images int": {"messages": [{"role": "user", "content": "x", "images": 5}]},
        "images [5]": {"messages": [{"role": "user", "content": "x", "images": [5]}]},
        "images not base64": {"messages": [{"role": "user", "content": "x", "images": ["%%"]}]},
        "images valid base64, no vision": {
            "messages": [{"role": "user", "content": "x", "images": ["aGVsbG8="]}]
        },
        "tools 5": {"tools": 5},
        "tools [5]": {"tools": [5]},
        "tools no function": {"tools": [{"type": "function"}]},
        "tools function str": {"tools": [{"type": "function", "function": "f"}]},
        "tool_calls bad": {"messages": [{"role": "assistant", "tool_calls": 5}]},
        "tool_calls args int": {
            "messages": [
                {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": 5}}]}
            ]
        },
        "stream str": {"stream": "yes"},
        "format int": {"format": 5},
        "format other str": {"format": "xml"},
        "keep_alive list": {"keep_alive": [1]},
        "think list": {"think": [1]},
    }
    for label, fields in wrong.items():
        add(f"chat {label}", chat, {"model": "tiny", "messages": [], **fields})
    for label, fields in {
        "prompt int": {"prompt": 5},
        "prompt list": {"prompt": ["a"]},
        "system int": {"system": 5},
        "raw str": {"raw": "yes"},
        "images 5": {"images": 5},
        "images [5]": {"images": [5]},
        "images valid, no vision": {"images": ["aGVsbG8="]},
        "options.num_predict str": {"options": {"num_predict": "5"}},
        "options.top_k float str": {"options": {"top_k": "1.5"}},
        "stream int list": {"stream": [1]},
    }.items():
        add(f"generate {label}", gen, {"model": "tiny", "stream": False, **fields})
    for label, fields in {
        "input int": {"input": 5},
        "input list of int": {"input": [1, 2]},
        "input missing": {},
        "input dict": {"input": {"a": 1}},
        "truncate str": {"truncate": "x"},
    }.items():
        add(f"embed {label}", embed, {"model": "emb", **fields})
    add("embeddings prompt int", "/api/embeddings", {"model": "emb", "prompt": 5})
    add("show model int", "/api/show", {"model": 5})
    add("show nothing", "/api/show", {})
    # OpenAI bodies of the wrong shape that llama-server itself chokes on.
    add("v1 messages 5", v1, {"model": "tiny", "messages": 5})
    add(
        "v1 tools 5",
        v1,
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": 5},
    )
    add("v1 stream str", v1, {"model": "tiny", "stream": "yes", "messages": []})
    add("v1 model forbidden", v1, {"model": "secret-model", "messages": []})
    add("v1 model unknown", v1, {"model": "nope", "messages": []})
    add("v1 embed on chat model", "/v1/embeddings", {"model": "tiny", "input": "x"})
    add("v1 max_tokens str", "/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": "5"})
    add("v1 prompt dict", "/v1/completions", {"model": "tiny", "prompt": {"a": 1}})
    add("v1 rerank nonsense", "/v1/rerank", {"model": "tiny", "query": 5, "documents": 5})
    # Paths, methods and headers.
    add(
        "dashboard unknown path",
        "/dashboard/nope/../../etc",
        b"",
        f"Authorization: Bearer {ADMIN}".encode(),
        keyed=False,
    )
    add(
        "dashboard unknown api",
        "/dashboard/api/v1/../x",
        b"",
        f"Authorization: Bearer {ADMIN}".encode(),
        keyed=False,
    )
    add("unknown route", "/v2/chat", OK_CHAT)
    add("unknown ollama route", "/api/push", {"model": "tiny"})
    add("pull of an unknown model", pull, {"model": "nope"})
    add("pull model int", pull, {"model": 5})
    add("pull stream str", pull, {"model": "tiny", "stream": "yes"})
    add("delete by POST", "/api/delete", {"model": "tiny"})
    add("header of 8 KB", v1, {"model": "tiny", "messages": 5}, b"X-Junk: " + b"j" * 8000)
    add(
        "100 extra header lines",
        chat,
        {"model": "tiny", "options": 3},
        *[b"X-H%d: v" % i for i in range(100)],
    )
    add("header of 100 KB", v1, OK_CHAT, b"X-Junk: " + b"j" * 100_000)
    add("1000 header lines", v1, OK_CHAT, *[b"X-H%d: v" % i for i in range(1000)])
    add("non-ascii header value", v1, {"model": "tiny", "messages": 5}, b"X-Name: \xff\xfe")
    add(
        "wrong content-type",
        chat,
        b"model=tiny",
        b"Content-Type: application/x-www-form-urlencoded",
    )
    return cases


def style_ok(path: str, body: bytes) -> bool:
    try:
        data = json.loads(body)
    except ValueError:
        return False
    err = data.get("error") if isinstance(data, dict) else None
    if path.startswith("/api/"):
        return isinstance(err, str) and bool(err)
    return isinstance(err, dict) and {"message", "type", "code"} <= set(err)


def test_hostile_inputs_get_quick_4xx_json_in_the_routes_style(edge: Edge) -> None:
    cases = hostile_inputs(edge.port)
    assert len(cases) >= 100
    bad = []
    for label, path, body, extra in cases:
        method = (
            "GET"
            if path.startswith(("/v1/models", "/api/tags", "/metrics", "/dashboard"))
            else "POST"
        )
        data = post_raw(edge.port, path, body, extra)
        if method == "GET":
            data = data.replace(b"POST ", b"GET ", 1)
        t0 = time.monotonic()
        status, _headers, reply = raw(edge.port, data)
        took = time.monotonic() - t0
        if not (400 <= status < 500 and style_ok(path, reply) and took < 5):
            bad.append((label, status, round(took, 2), reply[:160]))
    assert not bad, f"{len(bad)} of {len(cases)} hostile inputs mishandled: {bad}"
    # Nothing else broke.
    assert httpx.get(f"{edge.base}/health").status_code == 200
    r = httpx.post(f"{edge.base}/v1/chat/completions", json=OK_CHAT, headers=auth(), timeout=30)
    assert r.status_code == 200, r.text


def test_key_is_checked_before_the_body_and_hides_models(edge: Edge) -> None:
    # No key: a known and an unknown model read the same.
    known = httpx.post(
        f"{edge.base}/v1/chat/completions", json={**OK_CHAT, "model": "secret-model"}
    )
    unknown = httpx.post(f"{edge.base}/v1/chat/completions", json={**OK_CHAT, "model": "no-such"})
    assert known.status_code == unknown.status_code == 401
    assert known.json() == unknown.json()
    # ...and it is answered without waiting for a body that never comes.
    head = post_raw(edge.port, "/api/chat", b"")
    head = head.replace(b"Content-Length: 0", b"Content-Length: 1000")
    t0 = time.monotonic()
    status, _, body = raw(edge.port, head, timeout=5)
    assert status == 401 and time.monotonic() - t0 < 2 and json.loads(body)["error"]

    ids = [m["id"] for m in httpx.get(f"{edge.base}/v1/models", headers=auth()).json()["data"]]
    assert sorted(ids) == ["emb", "tiny"]
    tags = httpx.get(f"{edge.base}/api/tags", headers=auth()).json()["models"]
    assert sorted(m["name"] for m in tags) == ["emb", "tiny"]
    ps = httpx.get(f"{edge.base}/api/ps", headers=auth()).json()["models"]
    assert {m["name"] for m in ps} <= {"emb", "tiny"}
    admin_ids = {
        m["id"] for m in httpx.get(f"{edge.base}/v1/models", headers=auth(ADMIN)).json()["data"]
    }
    assert admin_ids == {"emb", "tiny", "secret-model", "slotted"}

    user = httpx.post(f"{edge.base}/api/show", json={"model": "tiny"}, headers=auth()).json()
    assert "file://" not in json.dumps(user) and user["parameters"] == ""
    admin = httpx.post(f"{edge.base}/api/show", json={"model": "tiny"}, headers=auth(ADMIN)).json()
    assert admin["modelfile"].startswith("FROM file://")
    forbidden = httpx.post(f"{edge.base}/api/show", json={"model": "secret-model"}, headers=auth())
    assert forbidden.status_code == 403 and isinstance(forbidden.json()["error"], str)


def test_dashboard_data_only_through_the_gateways_admin_check(edge: Edge) -> None:
    import yaml

    ui_url = yaml.safe_load(edge.stack.config.read_text())["gateway"]["ui_url"]
    direct = httpx.get(f"{ui_url}/dashboard/state", timeout=5)
    assert direct.status_code == 401 and direct.json()["error"]["code"] == "ui_secret_required"
    spoofed = httpx.get(
        f"{ui_url}/dashboard/state", headers={"x-lls-ui-secret": "guess"}, timeout=5
    )
    assert spoofed.status_code == 401
    assert httpx.get(f"{edge.base}/dashboard/state", headers=auth()).status_code == 403
    r = httpx.get(f"{edge.base}/dashboard/state", headers=auth(ADMIN))
    assert r.status_code == 200 and isinstance(r.json(), dict)
    # The UI listens on loopback only.
    host = ui_url.split("//")[1].split(":")[0]
    assert host == "127.0.0.1"


def test_slow_clients_are_cut_off(edge: Edge) -> None:
    """One byte a second, in the head or in the body: closed (408) within the deadlines."""

    def trickle(data: bytes, first: bytes = b"") -> tuple[float, bytes]:
        t0 = time.monotonic()
        got = b""
        with socket.create_connection(("127.0.0.1", edge.port), timeout=30) as s:
            s.sendall(first)
            for i in range(len(data)):
                try:
                    s.sendall(data[i : i + 1])
                    s.settimeout(1.0)
                    chunk = s.recv(4096)
                    got += chunk
                    if not chunk:
                        break
                except TimeoutError:
                    continue
                except OSError:
                    break
                if time.monotonic() - t0 > 30:
                    break
        return time.monotonic() - t0, got

    head = post_raw(
        edge.port,
        "/v1/chat/completions",
        json.dumps(OK_CHAT).encode(),
        [f"Authorization: Bearer {KEY}".encode()],
    )
    split = head.index(b"\r\n\r\n") + 4
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        slow_head = pool.submit(trickle, head)
        slow_body = pool.submit(trickle, head[split:], head[:split])
        (t_head, got_head), (t_body, got_body) = slow_head.result(), slow_body.result()
    print(f"slow head cut off after {t_head:.1f} s, slow body after {t_body:.1f} s")
    assert t_head < 15 and b" 408 " in got_head.split(b"\r\n")[0] + b" "
    assert t_body < 15 and b" 408 " in got_body.split(b"\r\n")[0] + b" "
    assert b'"error"' in got_head and b'"error"' in got_body


def test_idle_connections_do_not_stop_health(edge: Edge) -> None:
    socks: list[socket.socket] = []
    try:
        for _ in range(1500):
            s = socket.socket()
            s.setblocking(True)
            s.connect(("127.0.0.1", edge.port))
            socks.append(s)
        time.sleep(0.5)  # let the gateway accept them all
        worst = 0.0
        with httpx.Client(timeout=5) as c:
            for _ in range(10):
                t0 = time.monotonic()
                assert (
                    c.get(f"{edge.base}/health", headers={"Connection": "close"}).status_code == 200
                )
                worst = max(worst, time.monotonic() - t0)
        print(f"/health with 1,500 idle connections: worst of 10 {worst * 1000:.1f} ms")
        assert worst < 1.0
    finally:
        for s in socks:
            s.close()


def test_cross_site_requests_that_change_state_are_refused(edge: Edge) -> None:
    """What a web page on another site makes its visitor's browser send: refused (403) before
    anything happens; the gateway's own pages and clients that send no Origin are served."""
    evil = {"Origin": "http://evil.example"}
    admin = auth(ADMIN)
    gone = httpx.request(
        "DELETE", f"{edge.base}/api/delete", json={"model": "tiny"}, headers={**admin, **evil}
    )
    assert gone.status_code == 403 and "allowed_origins" in gone.json()["error"], gone.text
    # a form or no-cors fetch: text/plain, no preflight; the key would come from a cookie
    for path, body in (("/api/pull", b'{"model": "tiny"}'), ("/api/delete", b'{"model": "x"}')):
        r = httpx.post(
            f"{edge.base}{path}",
            content=body,
            headers={**admin, **evil, "Content-Type": "text/plain"},
        )
        assert r.status_code == 403 and isinstance(r.json()["error"], str), (path, r.text)
    for origin in ("http://evil.example", "null", f"http://localhost:{edge.port}"):
        r = httpx.post(
            f"{edge.base}/v1/chat/completions", json=OK_CHAT, headers={**auth(), "Origin": origin}
        )
        assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed", origin
    r = httpx.post(f"{edge.base}/dashboard/anything", headers={**admin, **evil})
    assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
    # the file is still there: the refused delete did nothing
    ok = httpx.post(f"{edge.base}/v1/chat/completions", json=OK_CHAT, headers=auth(), timeout=30)
    assert ok.status_code == 200, ok.text
    # same origin passes the check (and then meets the route's own: no such model)
    own = {"Origin": f"http://127.0.0.1:{edge.port}"}
    r = httpx.request(
        "DELETE", f"{edge.base}/api/delete", json={"model": "no-such"}, headers={**admin, **own}
    )
    assert r.status_code == 404, r.text
    # reads change nothing: allowed (with no CORS headers, the page cannot read them anyway)
    r = httpx.get(f"{edge.base}/v1/models", headers={**auth(), **evil})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_rebinding_host_is_refused_on_loopback(edge: Edge) -> None:
    """A page whose name now resolves to 127.0.0.1 sends its own name as Host: refused on
    every route but /health; loopback names are served."""
    bad = {"Host": f"rebind.evil.example:{edge.port}"}
    r = httpx.get(f"{edge.base}/v1/models", headers={**auth(), **bad})
    assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed", r.text
    r = httpx.post(f"{edge.base}/api/pull", json={"model": "tiny"}, headers={**auth(ADMIN), **bad})
    assert r.status_code == 403 and "allowed_hosts" in r.json()["error"]
    r = httpx.get(f"{edge.base}/dashboard/state", headers={**auth(ADMIN), **bad})
    assert r.status_code == 403
    assert httpx.get(f"{edge.base}/health", headers=bad).status_code == 200
    for host in (f"localhost:{edge.port}", f"127.0.0.1:{edge.port}", "[::1]"):
        r = httpx.get(f"{edge.base}/v1/models", headers={**auth(), "Host": host})
        assert r.status_code == 200, (host, r.text)


def test_keys_in_urls_only_on_the_dashboard_and_never_logged(edge: Edge) -> None:
    for path in ("/v1/models", "/api/tags"):
        r = httpx.get(f"{edge.base}{path}", params={"key": KEY})
        assert r.status_code == 401, (path, r.text)
        assert "only /dashboard" in json.dumps(r.json())
    r = httpx.post(f"{edge.base}/v1/chat/completions", params={"key": KEY}, json=OK_CHAT)
    assert r.status_code == 401 and r.json()["error"]["code"] == "key_in_url"
    # ...even beside a good header: the key in the URL has leaked, say so
    r = httpx.get(f"{edge.base}/v1/models", params={"key": KEY}, headers=auth())
    assert r.status_code == 401 and r.json()["error"]["code"] == "key_in_url"

    page = httpx.get(f"{edge.base}/dashboard", params={"key": ADMIN})
    assert page.status_code == 200, page.text
    cookie = page.headers["set-cookie"].lower()
    assert "path=/dashboard" in cookie and "httponly" in cookie and "samesite=strict" in cookie
    jar = {"lls_key": page.cookies["lls_key"]}
    assert httpx.get(f"{edge.base}/dashboard/state", cookies=jar).status_code == 200
    r = httpx.get(f"{edge.base}/v1/models", cookies=jar)  # API routes take no cookie
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(f"{edge.base}/dashboard/state", params={"key": ADMIN, "x": "1"})
    assert r.status_code == 200
    for key in (KEY, ADMIN, TRUSTED):  # what the stack logged (gateway, UI, all of it)
        assert key not in edge.stack.logs()


async def _slots(edge: Edge, model: str) -> list[dict]:
    """What the instance of `model` itself says about its slots (its /slots, with its key)."""
    from lls import instance_key
    from lls.bus import connect, kv_snapshot

    bus = await connect(edge.nats.url, "test")
    try:
        recs = (await kv_snapshot(bus, bus.instances, proto.InstanceRecord)).values()
        [rec] = [r for r in recs if r.model == model and r.state == proto.InstanceState.READY]
        placed = await instance_key.read(bus, rec.host or "", rec.instance_id)  # as the operator
    finally:
        await bus.close()
    assert placed is not None
    key = placed.key
    async with httpx.AsyncClient(timeout=10) as c:
        r = await c.get(f"{rec.endpoint}/slots", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    return sorted(r.json(), key=lambda s: s["id"])


def test_slot_fields_reach_llama_server_only_from_trusted_keys(edge: Edge) -> None:
    """id_slot and cache_prompt of an untrusted key are dropped before llama-server, even
    spelled with JSON escapes; a trusted key's arrive. `timings` stay in the answers."""
    p1, p2 = "a" * 32, "z" * 36  # no common beginning: llama-server's own pick is its LRU slot

    def ask(key: str, body: bytes) -> dict:
        r = httpx.post(
            f"{edge.base}/v1/completions",
            content=body,
            headers={**auth(key), "Content-Type": "application/json"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        return r.json()

    def body(prompt: str, extra: str) -> bytes:
        return f'{{"model": "slotted", "prompt": "{prompt}", "max_tokens": 2{extra}}}'.encode()

    # trusted, fresh instance: slot 0 as asked (left alone, llama-server takes slot 1)
    ask(TRUSTED, body(p1, ', "id_slot": 0'))
    slots = asyncio.run(_slots(edge, "slotted"))
    assert "id_task" in slots[0] and "id_task" not in slots[1], slots
    # trusted, cache_prompt false: nothing reused, though slot 0 holds this very prompt
    again = ask(TRUSTED, body(p1, ', "id_slot": 0, "cache_prompt": false'))
    assert again["timings"]["cache_n"] == 0, again["timings"]
    trusted_task = asyncio.run(_slots(edge, "slotted"))[0]["id_task"]

    # untrusted (an admin key is not a trusted one), id_slot spelled with an escape: dropped,
    # so llama-server takes its least recently used slot, 1
    ask(ADMIN, body(p2, ', "id\\u005fslot": 0'))
    slots = asyncio.run(_slots(edge, "slotted"))
    assert "id_task" in slots[1] and slots[0]["id_task"] == trusted_task, slots
    # untrusted cache_prompt false: dropped, so its cached prompt is reused after all
    cached = ask(ADMIN, body(p2, ', "id_slot": 0, "cache_prompt": false'))
    assert cached["timings"]["cache_n"] > 0, cached["timings"]
    assert asyncio.run(_slots(edge, "slotted"))[0]["id_task"] == trusted_task  # slot 0 untouched


def test_silent_bus_warm_served_cold_refused_fast(edge: Edge) -> None:
    """Runs last: NATS frozen (SIGSTOP) like a hung server; nats-py still thinks it is up."""
    assert edge.nats.proc is not None
    os.kill(edge.nats.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(3.5)  # the probe notices within ~2 s
        health = httpx.get(f"{edge.base}/health", timeout=5)
        assert health.status_code == 503 and "bus" in health.json()["bus"].lower()
        warm = httpx.post(
            f"{edge.base}/v1/chat/completions", json=OK_CHAT, headers=auth(), timeout=10
        )
        assert warm.status_code == 200, warm.text
        t0 = time.monotonic()
        cold = httpx.post(
            f"{edge.base}/v1/chat/completions",
            json={**OK_CHAT, "model": "secret-model"},
            headers=auth(ADMIN),
            timeout=30,
        )
        took = time.monotonic() - t0
        assert cold.status_code == 503 and took < 5, (cold.status_code, took, cold.text)
        assert "bus" in cold.json()["error"]["message"] and int(cold.headers["retry-after"]) >= 1
    finally:
        os.kill(edge.nats.proc.pid, signal.SIGCONT)
    deadline = time.monotonic() + 10
    while httpx.get(f"{edge.base}/health").status_code != 200:
        assert time.monotonic() < deadline, "gateway did not see the bus come back"
        time.sleep(0.2)


def test_open_gateway_warns_in_its_log_and_in_lls_ps(tmp_path: Path, nats_url: str) -> None:
    """A gateway that listens beyond loopback with no API keys says so: several WARNING lines
    at start naming the fix, and a line in `lls ps` (from its activity report on the bus)."""
    cluster = Cluster(tmp_path, nats_url, {})
    cluster.shared["gateway"]["host"] = "0.0.0.0"
    cluster.spawn("gateway")
    try:
        cluster.wait_gateway()
        # beyond loopback it cannot know the names it is reached by: any Host is served
        r = httpx.get(f"{cluster.base}/v1/models", headers={"Host": "gw.lan:5000"}, timeout=5)
        assert r.status_code == 200, r.text
        log = cluster.logs("gateway").splitlines()
        [first] = [i for i, line in enumerate(log) if "OPEN GATEWAY" in line]
        banner = log[first : first + 4]  # several lines, one WARNING record each
        assert all(" WARNING " in line for line in banner), banner
        text = "\n".join(banner)
        assert "0.0.0.0" in text and "no API keys" in text
        assert "gateway.api_keys" in text and "gateway.host: 127.0.0.1" in text
        deadline = time.monotonic() + 15
        while True:  # the report goes out every second
            ps = subprocess.run(
                [sys.executable, "-m", "lls.cli", "--config", str(tmp_path / "gateway.yaml"), "ps"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert ps.returncode == 0, ps.stderr
            lines = [line for line in ps.stdout.splitlines() if line.startswith("warning:")]
            if lines or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        [line] = lines
        assert line.startswith("warning: gateway gw-") and "OPEN GATEWAY" in line, ps.stdout
        assert "0.0.0.0" in line and "gateway.api_keys" in line, line
    finally:
        cluster.stop()
