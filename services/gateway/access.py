"""Who a request is from and what its API key may use: the key a client presented (headers;
a URL or cookie key on /dashboard only), the check against gateway.api_keys, its scope of
models and admin rights, and the configured model a requested name stands for.

Every route family (routes_openai, routes_ollama, routes_admin) asks here, from the headers,
before any body is read.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from lls.config import ApiKey, Config

from .admission import BY_ADDRESS
from .errors import ApiError


def on_dashboard(path: str) -> bool:
    """The browser's pages: the only routes that take a key from the URL or a cookie (a
    browser opening a link cannot send a header)."""
    return path == "/dashboard" or path.startswith("/dashboard/")


def presented_key(request: Request) -> str:
    """The key a client sent: Bearer or x-api-key; on /dashboard paths also `?key=` or the
    dashboard's cookie. A key in the URL of any other route is refused: URLs end up in
    proxy logs and browser history."""
    headers = request.headers
    auth = headers.get("authorization", "")
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    given = given or headers.get("x-api-key", "")
    query = request.scope.get("query_string")
    if on_dashboard(request.scope["path"]):
        if not given and (query or "cookie" in headers):
            given = request.query_params.get("key", "") or request.cookies.get("lls_key", "")
    elif query and "key" in request.query_params:
        raise ApiError(
            401,
            "API keys are not taken from the URL here (URLs end up in logs and browser "
            "history): send `Authorization: Bearer KEY` or `x-api-key: KEY`; only /dashboard "
            "takes ?key=",
            "key_in_url",
        )
    return given


def client(request: Request, key: ApiKey | None) -> str:
    """Who a request is from, for fair queuing: its API key's name, else its address."""
    if key is not None:
        return key.name
    return request.client.host if request.client else ""


def shown(key: ApiKey | None) -> str:
    """What the activity report calls a request's client: its key's name; addresses stay
    here (they are summed under BY_ADDRESS)."""
    return key.name if key is not None else BY_ADDRESS


def authenticate(cfg: Config, request: Request) -> ApiKey | None:
    """The caller's API key, from headers only (before any body is read); None when the
    gateway is open. A missing, unknown or malformed key (non-ASCII, say) is a 401."""
    keys = cfg.gateway.api_keys
    if not keys:
        return None
    given = presented_key(request).encode("utf-8", "replace")
    found = None
    for k in keys:  # compare against every key: the time taken does not tell which matched
        if hmac.compare_digest(k.key.encode(), given) and given:
            found = k
    if found is None:
        raise ApiError(401, "missing or invalid API key (Bearer or x-api-key)", "invalid_api_key")
    return found


def trusted(key: ApiKey | None) -> bool:
    """Whether a caller's SLOT_FIELDS reach llama-server: a trusted key's, and anyone's on an
    open gateway (no keys: no tenants to keep apart, and it warns when open to the network)."""
    return key is None or key.trusted


def may_use(key: ApiKey | None, model: str) -> bool:
    return key is None or not key.models or model in key.models


def check_key(cfg: Config, request: Request, model: str | None, admin: bool = False) -> None:
    """API keys (Bearer or x-api-key), optionally scoped to models; none configured = open."""
    key = authenticate(cfg, request)
    if key is None:
        return
    if admin and not key.admin:
        raise ApiError(403, "this API key may not use admin endpoints", "forbidden")
    if model is not None and not may_use(key, model):
        raise ApiError(403, f"this API key may not use model {model!r}", "model_forbidden")


def resolve(cfg: Config, name: str, key: ApiKey | None, path: str) -> str:
    """The configured model a name stands for, if this key may use it. A scoped key gets
    the same 403 for a model outside its scope and for one that does not exist."""
    model = cfg.resolve_model(name)
    if key is not None and key.models and model not in key.models:
        raise ApiError(403, f"this API key may not use model {name!r}", "model_forbidden")
    if model is None:
        raise ApiError(
            404,
            f"model {name!r} does not exist; GET /v1/models lists the models served here",
            "model_not_found",
        )
    if "embed" in path and not cfg.models[model].embeddings:
        raise ApiError(
            400,
            f"model {model!r} does not serve embeddings (set models.{model}.embeddings: true)",
            "embeddings_not_enabled",
        )
    return model
