"""Finding a file the user already has: an Ollama models dir or the Hugging Face hub cache.

Lookups are pure reads of directory layouts; callers verify sha256 before trusting a hit.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from services.downloader.sources import HfRef, OllamaRef

log = logging.getLogger(__name__)

OLLAMA_MODEL_MEDIA = "application/vnd.ollama.image.model"


@dataclass(frozen=True)
class Hit:
    path: Path  # the existing file (symlinks resolved)
    origin: str  # what DownloadCompleted.reused says, e.g. "ollama:/root/.ollama/models/..."


def _paths(value: str) -> list[Path]:
    return [Path(os.path.expanduser(p)) for p in value.split(os.pathsep) if p]


def ollama_dirs() -> list[Path]:
    """LLS_OLLAMA_MODELS (os.pathsep-separated), else Ollama's own OLLAMA_MODELS, else default."""
    value = os.environ.get("LLS_OLLAMA_MODELS") or os.environ.get("OLLAMA_MODELS")
    return _paths(value) if value else [Path("~/.ollama/models").expanduser()]


def hf_cache_dirs() -> list[Path]:
    """HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub (huggingface_hub's rules)."""
    if os.environ.get("HF_HUB_CACHE"):
        return _paths(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return [Path(os.path.expanduser(os.environ["HF_HOME"])) / "hub"]
    return [Path("~/.cache/huggingface/hub").expanduser()]


def _file(p: Path) -> Path | None:
    try:
        real = p.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    return real if real.is_file() else None


def ollama_blob_by_sha(root: Path, sha256: str) -> Path | None:
    return _file(root / "blobs" / f"sha256-{sha256.lower()}")


def ollama_model_blob(root: Path, ref: OllamaRef) -> Path | None:
    """manifests/<host>/<ns>/<name>/<tag> -> the model layer's blob."""
    manifest = root.joinpath(*ref.manifest_path().parts)
    try:
        layers = json.loads(manifest.read_text()).get("layers", [])
    except (OSError, ValueError, AttributeError):
        return None
    for layer in layers:
        if isinstance(layer, dict) and layer.get("mediaType") == OLLAMA_MODEL_MEDIA:
            digest = str(layer.get("digest", ""))
            if digest.startswith("sha256:"):
                return ollama_blob_by_sha(root, digest[len("sha256:") :])
    return None


def _repo_dir(root: Path, repo: str) -> Path:
    return root / ("models--" + repo.replace("/", "--"))


def hf_cached_file(root: Path, ref: HfRef) -> Path | None:
    """models--owner--repo/snapshots/<commit>/<path>, the commit found through refs/<branch>."""
    repo = _repo_dir(root, ref.repo)
    rev = ref.revision or "main"
    candidates: list[Path] = []
    try:
        commit = (repo / "refs" / rev).read_text().strip()
        candidates.append(repo / "snapshots" / commit / ref.path)
    except OSError:
        pass
    candidates.append(repo / "snapshots" / rev / ref.path)  # a commit hash as revision
    for c in candidates:
        if hit := _file(c):
            return hit
    if ref.revision is None:  # no pinned revision: any snapshot holding the file, newest first
        try:
            snaps = sorted((repo / "snapshots").iterdir(), key=_mtime, reverse=True)
        except OSError:
            return None
        for snap in snaps:
            if hit := _file(snap / ref.path):
                return hit
    return None


def hf_blob_by_sha(root: Path, sha256: str) -> Path | None:
    """LFS files are stored as blobs/<sha256> in every repo dir of the cache."""
    try:
        repos = [d for d in root.iterdir() if d.name.startswith("models--")]
    except OSError:
        return None
    for repo in repos:
        if hit := _file(repo / "blobs" / sha256.lower()):
            return hit
    return None


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def find(
    sha256: str | None,
    hf: HfRef | None,
    ollama: OllamaRef | None,
    ollama_roots: list[Path] | None = None,
    hf_roots: list[Path] | None = None,
) -> list[Hit]:
    """Candidate existing copies, best first: named matches, then content (sha256) matches."""
    ollama_roots = ollama_dirs() if ollama_roots is None else ollama_roots
    hf_roots = hf_cache_dirs() if hf_roots is None else hf_roots
    hits: list[Hit] = []
    for root in ollama_roots:
        if ollama is not None and (p := ollama_model_blob(root, ollama)):
            hits.append(Hit(p, f"ollama:{p}"))
        if sha256 and (p := ollama_blob_by_sha(root, sha256)):
            hits.append(Hit(p, f"ollama:{p}"))
    for root in hf_roots:
        if hf is not None and (p := hf_cached_file(root, hf)):
            hits.append(Hit(p, f"hf-cache:{p}"))
        if sha256 and (p := hf_blob_by_sha(root, sha256)):
            hits.append(Hit(p, f"hf-cache:{p}"))
    seen: set[Path] = set()
    unique = []
    for h in hits:
        if h.path not in seen:
            seen.add(h.path)
            unique.append(h)
    return unique
