"""Small running figures shared by the group and its ranks: a token rate over a sliding window and
latency percentiles. Times are `time.monotonic()` of one process: never compared across machines."""

from __future__ import annotations

from collections import deque


class RateWindow:
    """Events (e.g. tokens) per second over the last `window_s` seconds."""

    def __init__(self, window_s: float = 10.0):
        self.window_s = window_s
        self._events: deque[tuple[float, int]] = deque()  # (monotonic time, count)

    def add(self, now: float, count: int) -> None:
        self._events.append((now, count))
        self._forget(now)

    def rate(self, now: float) -> float:
        self._forget(now)
        if len(self._events) < 2:
            return 0.0
        span = now - self._events[0][0]
        return sum(n for _, n in self._events) / max(span, 1e-3)

    def _forget(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self.window_s:
            self._events.popleft()


class Percentiles:
    """The last `max_samples` samples, and their percentiles."""

    def __init__(self, max_samples: int = 4096):
        self._samples: deque[float] = deque(maxlen=max_samples)

    def add(self, value: float) -> None:
        self._samples.append(value)

    def get(self, q: float) -> float:
        """The q-quantile (0 <= q <= 1) of the samples kept, 0.0 when there are none."""
        ordered = sorted(self._samples)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0
