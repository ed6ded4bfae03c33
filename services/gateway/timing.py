"""Measured times per model, for Retry-After hints that come from what happened here rather
than from constants."""

from __future__ import annotations

ALPHA = 0.2  # weight of the newest sample: recent swaps and answers count most


class Ewma:
    """An exponentially weighted moving average per model."""

    def __init__(self) -> None:
        self._avg: dict[str, float] = {}

    def add(self, model: str, value: float) -> None:
        cur = self._avg.get(model)
        self._avg[model] = value if cur is None else cur + ALPHA * (value - cur)

    def get(self, model: str, default: float) -> float:
        return self._avg.get(model, default)
