"""The gateway's defences against web pages (services/gateway/edge.py), as pure decisions:
which Host and Origin a request may carry, when the gateway warns it is open, and that Ollama
options never carry llama-server's slot fields. tests/test_gateway_edge.py shows the same on
a real stack."""

from __future__ import annotations

import pytest

from lls.config import ConfigError, GatewayConfig, parse
from services.gateway import ollama
from services.gateway.edge import BrowserChecks, host_name, is_loopback, open_gateway_warning


def headers(**given: str) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode("latin-1")) for k, v in given.items()]


def checks(bound: str = "127.0.0.1", **gateway: object) -> BrowserChecks:
    return BrowserChecks.of(parse({"gateway": {"host": bound, **gateway}}).gateway, bound)


def code(refused: object) -> str | None:
    return getattr(refused, "code", None)


def test_loopback_gateway_answers_only_hosts_naming_this_machine() -> None:
    c = checks()
    for host in ("127.0.0.1:5000", "localhost:5000", "LOCALHOST", "[::1]:5000", "127.0.0.7"):
        assert c.refusal("GET", "/v1/models", headers(host=host)) is None, host
    assert c.refusal("GET", "/v1/models", headers(host="app.localhost:5000")) is None
    for host in ("evil.example:5000", "evil.example", "10.0.0.5:5000", "127.0.0.1.evil.example"):
        for method, path in (("GET", "/v1/models"), ("POST", "/api/pull")):
            refused = c.refusal(method, path, headers(host=host))
            assert refused is not None and refused.status == 403, (host, path)
            assert refused.code == "host_not_allowed" and "gateway.allowed_hosts" in refused.message
    # probes may name anything; a request without Host (HTTP/1.0 tools) is not a browser's
    assert c.refusal("GET", "/health", headers(host="evil.example")) is None
    assert c.refusal("POST", "/v1/chat/completions", headers()) is None


def test_allowed_hosts_are_added_and_then_checked_beyond_loopback_too() -> None:
    assert checks().hosts is not None
    c = checks(allowed_hosts=["gw.example"])
    assert c.refusal("GET", "/v1/models", headers(host="GW.example:443")) is None
    assert code(c.refusal("GET", "/v1/models", headers(host="other.example"))) == "host_not_allowed"
    # beyond loopback a gateway is reached by names it cannot know: any, unless some are listed
    open_ = checks("0.0.0.0")
    assert open_.hosts is None
    assert open_.refusal("POST", "/v1/models", headers(host="gw.lan:5000")) is None
    listed = checks("0.0.0.0", allowed_hosts=["gw.lan"])
    assert listed.refusal("GET", "/", headers(host="gw.lan:5000")) is None
    assert listed.refusal("GET", "/", headers(host="localhost:5000")) is None
    assert code(listed.refusal("GET", "/", headers(host="x.example"))) == "host_not_allowed"


def test_cross_site_requests_that_change_state_are_refused() -> None:
    c = checks()
    host = "127.0.0.1:5000"
    for method, path in (
        ("POST", "/api/pull"),
        ("DELETE", "/api/delete"),
        ("POST", "/api/delete"),
        ("POST", "/dashboard/anything"),
        ("POST", "/v1/chat/completions"),
        ("PUT", "/v1/models"),
    ):
        for origin in ("http://evil.example", "null", "http://127.0.0.1:5001", "https://127.0.0.1"):
            refused = c.refusal(method, path, headers(host=host, origin=origin))
            assert refused is not None and refused.status == 403, (method, path, origin)
            assert refused.code == "origin_not_allowed"
            assert "gateway.allowed_origins" in refused.message
    # the gateway's own pages (same host:port, whatever the scheme a proxy ended) may
    for origin in ("http://127.0.0.1:5000", "HTTP://127.0.0.1:5000/", "https://127.0.0.1:5000"):
        assert c.refusal("POST", "/api/pull", headers(host=host, origin=origin)) is None
    # reads change nothing (and without CORS headers the page cannot read the answer)
    assert c.refusal("GET", "/v1/models", headers(host=host, origin="http://evil.example")) is None
    # clients that are not browsers send no Origin: unaffected
    assert c.refusal("POST", "/api/pull", headers(host=host)) is None


def test_allowed_origins_may_change_state() -> None:
    c = checks(allowed_origins=["https://gw.example"])
    proxied = headers(host="127.0.0.1:5000", origin="https://gw.example")  # Host rewritten
    assert c.refusal("POST", "/api/pull", proxied) is None
    other = headers(host="127.0.0.1:5000", origin="https://gw.example:8443")
    assert code(c.refusal("POST", "/api/pull", other)) == "origin_not_allowed"


@pytest.mark.parametrize(
    ("gateway", "key"),
    [
        ({"allowed_hosts": ["gw.example:5000"]}, "gateway.allowed_hosts[0]"),
        ({"allowed_hosts": ["a b"]}, "gateway.allowed_hosts[0]"),
        ({"allowed_origins": ["gw.example"]}, "gateway.allowed_origins[0]"),
        ({"allowed_origins": ["https://gw.example/app"]}, "gateway.allowed_origins[0]"),
        ({"allowed_origins": ["*"]}, "gateway.allowed_origins[0]"),
        ({"api_keys": [{"key": "12345678", "trusted": "yes"}]}, "gateway.api_keys[0].trusted"),
    ],
)
def test_bad_edge_settings_stop_start_up_naming_the_key(gateway: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        parse({"gateway": gateway})


def test_open_gateway_warns_only_beyond_loopback_without_keys() -> None:
    for bound in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert open_gateway_warning(GatewayConfig(host=bound), bound) == []
    keyed = parse({"gateway": {"host": "0.0.0.0", "api_keys": [{"key": "k" * 16}]}}).gateway
    assert open_gateway_warning(keyed, "0.0.0.0") == []
    for bound in ("0.0.0.0", "::", "10.0.0.5", "gw.lan"):
        lines = open_gateway_warning(GatewayConfig(host=bound), bound)
        text = " ".join(lines)
        assert len(lines) >= 3 and bound in text, bound
        assert "gateway.api_keys" in text and "gateway.host: 127.0.0.1" in text


def test_host_names_lose_port_brackets_and_case() -> None:
    assert host_name("[::1]:5000") == host_name("::1") == "::1"
    assert host_name("LocalHost.:80") == "localhost"
    assert host_name("gw.example:5000") == "gw.example"
    assert is_loopback("[::1]") and is_loopback("127.9.9.9") and is_loopback("a.localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("10.0.0.1")


def test_ollama_options_never_carry_slot_fields() -> None:
    # Ollama bodies are rebuilt from a fixed list of options: llama-server's id_slot and
    # cache_prompt cannot pass through them, trusted key or not.
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": false,'
    body += b' "options": {"id_slot": 1, "cache_prompt": false, "temperature": 0.5},'
    body += b' "id_slot": 1, "cache_prompt": false}'
    out = ollama.chat_request(ollama.parse_body(body, ollama.ChatRequest), "m")
    assert out["temperature"] == 0.5
    assert "id_slot" not in out and "cache_prompt" not in out
    gen = b'{"model": "m", "prompt": "hi", "options": {"id_slot": 0}, "id_slot": 0}'
    _path, out = ollama.generate_request(ollama.parse_body(gen, ollama.GenerateRequest), "m")
    assert "id_slot" not in out
