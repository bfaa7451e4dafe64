"""Token delivery latency measured across two machines' clocks, without Ray (cluster/telemetry.py)."""

from __future__ import annotations

import pytest

from cluster.telemetry import token_delivery_s

# On the group's clock: the poll leaves at `asked`, reaches the rank at `reached`, the batch leaves the rank at
# `sent` and reaches the group at `received` (3 ms each way). `sampled` is when the rank's step produced the token.
SCENARIOS = {
    # The poll waits on the rank 197 ms for a step, whose token leaves at once.
    "sampled-while-the-poll-waited": dict(asked=100.000, reached=100.003, sampled=100.200, sent=100.200,
                                          received=100.203),
    # The token waited on the rank for the next poll (which then does not wait).
    "sampled-before-the-poll": dict(asked=100.000, reached=100.003, sampled=99.950, sent=100.003,
                                    received=100.006),
}


@pytest.mark.parametrize("skew_s", [-5.0, 0.0, 5.0], ids=["rank-clock-5s-behind", "same-clock", "rank-clock-5s-ahead"])
@pytest.mark.parametrize("scenario", list(SCENARIOS), ids=list(SCENARIOS))
def test_token_delivery_is_the_same_whatever_offset_the_rank_clock_has(scenario, skew_s):
    t = SCENARIOS[scenario]
    on_rank = t["sampled"] + skew_s, t["sent"] + skew_s  # the rank reads its own clock
    delivery_s = token_delivery_s(*on_rank, waited_s=t["sent"] - t["reached"], asked_at_s=t["asked"],
                                  received_at_s=t["received"])
    assert delivery_s == pytest.approx(t["received"] - t["sampled"], abs=1e-9)
    # Comparing the two clocks directly would be off by the skew (negative for a rank clock 5 s ahead).
    assert t["received"] - on_rank[0] == pytest.approx(delivery_s - skew_s, abs=1e-9)


def test_token_delivery_is_never_negative_when_the_rank_reports_a_longer_wait_than_the_round_trip():
    # Clock rates differ between machines: a rank's wait may read a little longer than the round trip.
    assert token_delivery_s(sampled_at_s=7.0, sent_at_s=7.0, waited_s=0.2005, asked_at_s=1.0,
                            received_at_s=1.2) == 0.0

