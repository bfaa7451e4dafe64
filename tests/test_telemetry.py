"""Token delivery latency measured across two machines' clocks, without Ray (cluster/telemetry.py)."""

from __future__ import annotations

import pytest

from cluster.telemetry import one_way_s, token_delivery_s

# On the group's clock: a heartbeat asked at `asked` is answered at `answered` (3 ms each way); the rank's
# step samples a token at `sampled`, its batch leaves the rank at `sent` and reaches the group at `received`.
SCENARIOS = {
    # The token leaves as soon as its step ends.
    "sent-at-once": dict(asked=90.000, answered=90.006, sampled=100.200, sent=100.200, received=100.203),
    # The token waited on the rank behind the batch before it.
    "sent-later": dict(asked=90.000, answered=90.006, sampled=99.950, sent=100.003, received=100.006),
}


@pytest.mark.parametrize("skew_s", [-5.0, 0.0, 5.0], ids=["rank-clock-5s-behind", "same-clock", "rank-clock-5s-ahead"])
@pytest.mark.parametrize("scenario", list(SCENARIOS), ids=list(SCENARIOS))
def test_token_delivery_is_the_same_whatever_offset_the_rank_clock_has(scenario, skew_s):
    t = SCENARIOS[scenario]
    on_rank = t["sampled"] + skew_s, t["sent"] + skew_s  # the rank reads its own clock
    delivery_s = token_delivery_s(*on_rank, one_way_s(t["asked"], t["answered"]))
    assert delivery_s == pytest.approx(t["received"] - t["sampled"], abs=1e-9)
    # Comparing the two clocks directly would be off by the skew (negative for a rank clock 5 s ahead).
    assert t["received"] - on_rank[0] == pytest.approx(delivery_s - skew_s, abs=1e-9)

