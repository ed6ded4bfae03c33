"""The secret the gateway shows the UI service, so the dashboard's data is reachable only
through the gateway's admin check (not by whoever can reach the UI's port).

`LLS_UI_SECRET` when set (give the gateway's and the UI's hosts the same value); otherwise a
random secret kept in `<cache>/ui.secret` (mode 0600), created by whichever of the two
services starts first on this machine. In lls/ because both services use it (neither
imports the other).
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import time

from lls.paths import cache_dir

SECRET_HEADER = "x-lls-ui-secret"
ENV = "LLS_UI_SECRET"


@functools.cache
def ui_secret() -> str:
    if value := os.environ.get(ENV, "").strip():
        return value
    path = cache_dir() / "ui.secret"
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
    for _ in range(50):  # the other service may be writing it this very moment
        value = path.read_text().strip()
        if value:
            return value
        time.sleep(0.01)
    raise RuntimeError(f"{path} is empty: delete it and restart")
