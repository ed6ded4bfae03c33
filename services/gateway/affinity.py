"""Which replica of a model serves a request (gateway.routing).

To be filled in: prefix keys from request bodies and consistent hashing with bounded load.
"""

from __future__ import annotations


def prefix_key(body: bytes, path: str, chars: int) -> str | None:
    """A stable key for the start of a request's prompt, or None (no prompt: any replica)."""
    return None
