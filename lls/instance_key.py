"""Per-instance llama-server API keys, known only to the agent that starts the instance and
the gateway that proxies to it.

Both read one cluster secret (`cluster.secret_file`, created 0600 on first use) and derive
key = HMAC-SHA256(secret, instance_id). Nothing travels on the bus: a party that can read
or forge instance records still cannot call an instance. An adopted instance's key is derived
again from its id, so no key is ever stored. Rotating the secret: replace the file on every
host and restart the services; running instances keep their old key until restarted.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
from pathlib import Path

log = logging.getLogger(__name__)

SECRET_BYTES = 32
MIN_SECRET_BYTES = 16


class SecretError(RuntimeError):
    """The secret file cannot be read or made; the message names cluster.secret_file."""


def instance_key(secret: bytes, instance_id: str) -> str:
    return hmac.new(secret, instance_id.encode(), hashlib.sha256).hexdigest()


def load_or_create(path: Path) -> bytes:
    """The cluster secret in `path`, made (random, mode 0600) if the file does not exist.

    Creation is atomic (written aside, then linked into place), so an agent and a gateway
    starting together both end up with the same bytes.
    """
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_hex(SECRET_BYTES).encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails if someone else created it first: theirs wins
            log.info("created the cluster secret %s (copy it to every host)", path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        return _read(path)
    except OSError as e:
        raise SecretError(f"cluster.secret_file: cannot create {path}: {e.strerror or e}") from e


def _read(path: Path) -> bytes:
    try:
        st = path.stat()
        data = path.read_bytes().strip()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise SecretError(f"cluster.secret_file: cannot read {path}: {e.strerror or e}") from e
    if len(data) < MIN_SECRET_BYTES:
        raise SecretError(
            f"cluster.secret_file: {path} holds {len(data)} bytes; at least "
            f"{MIN_SECRET_BYTES} are needed (delete it to have one generated)"
        )
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s is readable by others; chmod 600 it", path)
    return data
