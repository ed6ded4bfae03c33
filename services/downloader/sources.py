"""From a model URL to what to fetch: plain URLs, hf://, modelscope://, split GGUFs.

Pure functions of the URL and the environment, so they are tested directly.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import quote, unquote, urlsplit

HF_DEFAULT_ENDPOINT = "https://huggingface.co"
MODELSCOPE_DEFAULT_ENDPOINT = "https://modelscope.cn"
SPLIT_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")


class SourceError(ValueError):
    """A URL or file name the downloader cannot use; the message says what to fix."""


# Never copied from, whatever the roots say: a "file" there is the kernel's, not a model.
FORBIDDEN_DIRS = (Path("/proc"), Path("/dev"), Path("/sys"))


def _has_dot_segments(path: str) -> bool:
    return any(unquote(seg) in (".", "..") for seg in path.split("/"))


def file_roots(configured: list[Path], model_urls: list[str]) -> list[Path]:
    """Folders file:// models may come from: the configured ones, else the folders of the
    config's own file:// models (so a forged command cannot copy any other local file)."""
    if configured:
        return configured
    return sorted({_file_path(u).parent for u in model_urls if u.startswith("file://")})


def _file_path(url: str) -> Path:
    u = urlsplit(url)
    return Path(unquote(u.netloc + u.path))


def _under(path: Path, roots: list[Path] | tuple[Path, ...]) -> bool:
    return any(path == r or path.is_relative_to(r) for r in roots)


def check_file_url(url: str, roots: list[Path]) -> Path:
    """The real path of a file:// URL (symlinks and '..' resolved), or SourceError when that
    real path is outside the allowed roots or in /proc, /dev or /sys. Only the resolved path
    counts: a symlink inside a root that points out of every root is refused."""
    raw = _file_path(url)
    if not raw.is_absolute():
        raise SourceError(f"{url}: file:// URLs need an absolute path")
    lexical = Path(os.path.normpath(raw))
    if _under(lexical, FORBIDDEN_DIRS):  # also by name: /proc/self/cwd/... resolves elsewhere
        raise SourceError(f"{url}: files under /proc, /dev or /sys are never models")
    real = Path(os.path.realpath(raw))
    check_real_path(url, real, roots, via=real != lexical)
    return real


def check_real_path(url: str, real: Path, roots: list[Path], via: bool = True) -> None:
    """Refuse a resolved path outside the (resolved) roots or in /proc, /dev or /sys. Also
    run on the file actually opened, so a link swapped in after the first check is caught."""
    resolves = f" (it resolves to {real})" if via else ""
    forbidden = FORBIDDEN_DIRS + tuple(Path(os.path.realpath(d)) for d in FORBIDDEN_DIRS)
    if _under(real, forbidden):
        raise SourceError(f"{url}{resolves}: files under /proc, /dev or /sys are never models")
    real_roots = [Path(os.path.realpath(r)) for r in roots]
    if not _under(real, real_roots):
        where = ", ".join(str(r) for r in real_roots) or "none"
        link = " a symlink may not lead out of them;" if via else ""
        raise SourceError(
            f"{url}{resolves}: not under an allowed folder ({where});{link} add {real.parent} "
            "to downloader.file_roots if models may come from there"
        )


@dataclass(frozen=True)
class HfRef:
    """A file in a Hugging Face repo: what the hub cache is searched for."""

    repo: str  # owner/name
    path: str  # inside the repo
    revision: str | None = None  # None = the default branch


@dataclass(frozen=True)
class OllamaRef:
    """An Ollama model name, split the way its manifests directory is laid out."""

    host: str
    namespace: str
    name: str
    tag: str

    def manifest_path(self) -> PurePosixPath:
        return PurePosixPath("manifests", self.host, self.namespace, self.name, self.tag)


@dataclass(frozen=True)
class Source:
    """One file to put in the store: where it comes from and under which name."""

    url: str  # http(s):// or file://, or ollama:// (only satisfiable from a local store)
    filename: str  # relative to the store
    headers: dict[str, str] = field(default_factory=dict)
    hf: HfRef | None = None
    ollama: OllamaRef | None = None


def hf_endpoint() -> str:
    # HF_ENDPOINT is what huggingface_hub reads; HF_MIRROR is what the seed used.
    return (
        os.environ.get("HF_ENDPOINT") or os.environ.get("HF_MIRROR") or HF_DEFAULT_ENDPOINT
    ).rstrip("/")


def modelscope_endpoint() -> str:
    return (os.environ.get("MODELSCOPE_ENDPOINT") or MODELSCOPE_DEFAULT_ENDPOINT).rstrip("/")


def _repo_ref(rest: str, scheme: str) -> tuple[str, str | None, str]:
    """'owner/repo[@rev]/path/file.gguf' -> ('owner/repo', rev, 'path/file.gguf')."""
    if _has_dot_segments(rest):  # would climb out of the repo (and out of a hub cache)
        raise SourceError(f"{scheme}://{rest}: '..' and '.' path segments are not allowed")
    parts = [p for p in rest.split("/") if p]
    if len(parts) < 3:
        raise SourceError(
            f"{scheme}:// URLs look like {scheme}://owner/repo[@revision]/file.gguf, got {scheme}://{rest}"
        )
    owner, repo, path = parts[0], parts[1], "/".join(parts[2:])
    revision = None
    if "@" in repo:
        repo, revision = repo.split("@", 1)
        if not revision:
            raise SourceError(f"{scheme}://{rest}: empty revision after '@'")
    return f"{owner}/{repo}", revision, path


def _quote_path(path: str) -> str:
    return "/".join(quote(p, safe="") for p in path.split("/"))


def hf_resolve_url(ref: HfRef, endpoint: str | None = None) -> str:
    rev = quote(ref.revision or "main", safe="")
    return f"{endpoint or hf_endpoint()}/{ref.repo}/resolve/{rev}/{_quote_path(ref.path)}"


def modelscope_resolve_url(repo: str, revision: str | None, path: str) -> str:
    rev = quote(revision or "master", safe="")
    return f"{modelscope_endpoint()}/models/{repo}/resolve/{rev}/{_quote_path(path)}"


def parse_hf_https(url: str) -> HfRef | None:
    """An https://<hf endpoint>/owner/repo/resolve/<rev>/<path> URL as an HfRef (for cache reuse)."""
    u = urlsplit(url)
    hosts = {urlsplit(hf_endpoint()).netloc, "huggingface.co", "hf.co"}
    if u.scheme not in ("http", "https") or u.netloc not in hosts:
        return None
    parts = [unquote(p) for p in u.path.split("/") if p]
    if len(parts) < 5 or parts[2] != "resolve" or _has_dot_segments(u.path):
        return None  # no hub-cache lookup for a path that could climb out of it
    return HfRef(repo=f"{parts[0]}/{parts[1]}", revision=parts[3], path="/".join(parts[4:]))


def parse_ollama(name: str) -> OllamaRef:
    """'llama3.2:1b', 'user/model:tag' or 'host/ns/model:tag' (tag defaults to 'latest')."""
    base, _, tag = name.partition(":")
    parts = [p for p in base.split("/") if p]
    if not parts or len(parts) > 3 or any(p in (".", "..") for p in [*parts, tag]) or "/" in tag:
        raise SourceError(f"not an Ollama model name: {name!r} (expected name[:tag])")
    host, ns = "registry.ollama.ai", "library"
    if len(parts) == 3:
        host, ns = parts[0], parts[1]
    elif len(parts) == 2:
        ns = parts[0]
    return OllamaRef(host=host, namespace=ns, name=parts[-1], tag=tag or "latest")


def _hf_headers() -> dict[str, str]:
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def _modelscope_headers() -> dict[str, str]:
    token = os.environ.get("MODELSCOPE_API_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def check_filename(filename: str) -> str:
    """Store file names are relative, stay inside the store and avoid our staging dir."""
    p = PurePosixPath(filename)
    if not filename or p.is_absolute() or ".." in p.parts or p.parts[0].startswith(".lls"):
        raise SourceError(
            f"bad file name {filename!r}: it must be a relative path inside the model store"
        )
    return str(p)


def split_names(name: str) -> list[str]:
    """All part names of a split GGUF given its first part, else [name]."""
    m = SPLIT_RE.search(name)
    if not m or m.group(1) != "00001":
        return [name]
    count = int(m.group(2))
    head = name[: m.start()]
    return [f"{head}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


def _split_url(url: str, index: int) -> str:
    """The URL of part `index`, replacing the split suffix at the end of the URL's path."""
    u = urlsplit(url)
    path = unquote(u.path) if u.scheme == "file" else u.path
    m = SPLIT_RE.search(path)
    if not m:
        return url
    new_path = f"{path[: m.start()]}-{index:05d}-of-{m.group(2)}.gguf"
    if u.scheme == "file":
        return "file://" + new_path
    return u._replace(path=new_path).geturl()


def resolve(url: str, filename: str) -> list[Source]:
    """The files to fetch for one DownloadFile command, in order (several for a split GGUF).

    For a split GGUF (the URL names part 00001) every part is fetched; the store names keep
    the `-0000k-of-0000N.gguf` suffix, which llama-server needs to find the other parts.
    """
    filename = check_filename(filename)
    hf: HfRef | None = None
    ollama: OllamaRef | None = None
    headers: dict[str, str] = {}
    if url.startswith("hf://"):
        repo, rev, path = _repo_ref(url[len("hf://") :], "hf")
        hf = HfRef(repo=repo, revision=rev, path=path)
        http_url = hf_resolve_url(hf)
        headers = _hf_headers()
    elif url.startswith("modelscope://"):
        repo, rev, path = _repo_ref(url[len("modelscope://") :], "modelscope")
        http_url = modelscope_resolve_url(repo, rev, path)
        headers = _modelscope_headers()
    elif url.startswith("ollama://"):
        ollama = parse_ollama(url[len("ollama://") :])
        http_url = url
    elif url.startswith(("http://", "https://")):
        http_url = url
        hf = parse_hf_https(url)
        if hf is not None and urlsplit(url).netloc in (urlsplit(hf_endpoint()).netloc, "hf.co"):
            headers = _hf_headers()
    elif url.startswith("file://"):
        http_url = url
    else:
        raise SourceError(
            f"unsupported URL {url!r}: use http(s)://, file://, hf://owner/repo/file.gguf "
            "or modelscope://owner/repo/file.gguf"
        )

    names = split_names(filename)
    src_names = split_names(unquote(PurePosixPath(urlsplit(http_url).path).name))
    if len(src_names) > 1 and len(names) == 1:
        # llama.cpp finds parts 2..N from the first part's name, so the store keeps the suffix
        stem = filename[: -len(".gguf")] if filename.endswith(".gguf") else filename
        names = split_names(f"{stem}-00001-of-{len(src_names):05d}.gguf")
    if len(names) == 1 or len(src_names) != len(names):
        return [Source(http_url, filename, headers, hf, ollama)]
    sources = []
    for i, name in enumerate(names, start=1):
        part_hf = None
        if hf is not None:
            part_hf = HfRef(hf.repo, _split_url("/" + hf.path, i).lstrip("/"), hf.revision)
        sources.append(Source(_split_url(http_url, i), name, headers, part_hf, None))
    return sources
