"""Whether the downloader acts on a command: only what its own config says about the model.

A command names a model and carries what to fetch (url, sha256) and where to put it (the
store file name). The downloader trusts none of that: each must be exactly what its own
`models.<name>` gives, so a forged or stale command cannot make it fetch another URL, store
under another name, or accept another checksum. A pure function of the command and the
config's models, tested directly.
"""

from __future__ import annotations

from collections.abc import Mapping

import proto
from lls.config import ModelConfig, store_filename_of

Command = proto.DownloadFile | proto.DeleteFile | proto.InspectModel


def _sha(value: str | None) -> str:
    return (value or "").lower()


def _short(value: str | None) -> str:
    return _sha(value)[:12] + "…" if value else "none"


def refusal(cmd: Command, models: Mapping[str, ModelConfig]) -> str | None:
    """Why the downloader must not act on `cmd`, or None when the command carries exactly its
    config's url, sha256 and store file name for the model. URLs are not quoted (events are
    readable by every identity, and a URL may carry a signed query); file names and checksums
    are."""
    m = models.get(cmd.model)
    if m is None:
        return f"model {cmd.model!r} is not in this downloader's config"
    diffs = []
    if not isinstance(cmd, proto.DeleteFile) and cmd.url != m.url:
        diffs.append("url")
    if isinstance(cmd, proto.DownloadFile) and _sha(cmd.sha256) != _sha(m.sha256):
        diffs.append(f"sha256 ({_short(cmd.sha256)}, the config's {_short(m.sha256)})")
    expected = store_filename_of(cmd.model, m)
    if cmd.filename != expected:
        diffs.append(f"file name ({cmd.filename!r}, the config's {expected!r})")
    if not diffs:
        return None
    verb = "differs" if len(diffs) == 1 else "differ"
    return (
        f"the command's {' and '.join(diffs)} {verb} from this downloader's config for model "
        f"{cmd.model}; nothing was fetched or changed. If the model's url or sha256 just "
        "changed, reload every service's config"
    )
