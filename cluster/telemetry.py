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


def token_delivery_s(sampled_at_s: float, sent_at_s: float, one_way_s: float) -> float:
    """How long a token took from its rank's step to the group: its age on the rank when its batch left
    plus one way of the transport, each measured on one clock (the two machines' clocks may be seconds
    apart, so a time read on one is never compared with a time read on the other).

    Args:
        sampled_at_s, sent_at_s: the rank's monotonic clock when its step sampled the token and when the
            batch holding it left.
        one_way_s: the transport from rank to group, `one_way_s` of a heartbeat (the group's clock).
    Returns:
        seconds, >= 0.
    """
    return max(0.0, sent_at_s - sampled_at_s) + one_way_s


def one_way_s(asked_at_s: float, answered_at_s: float) -> float:
    """Half the round trip of a call the rank answers at once (its heartbeat), on the caller's clock:
    the transport taken as the same both ways."""
    return max(0.0, answered_at_s - asked_at_s) / 2
