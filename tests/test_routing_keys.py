"""engine/routing.py: the prefix keys both routing levels share, and the affinity table."""

from __future__ import annotations

from engine.routing import PrefixAffinity, prefix_routing_keys


def test_keys_cover_full_blocks_only_and_chain_so_a_key_names_the_whole_prefix():
    prompt = list(range(100, 150))  # 50 tokens: 3 full blocks of 16
    keys = prefix_routing_keys(prompt, 16)
    assert len(keys) == 3 and len(set(keys)) == 3
    assert prefix_routing_keys(prompt[:48] + [7, 8], 16) == keys  # the partial block does not count
    longer = prefix_routing_keys(prompt + list(range(30)), 16)
    assert longer[:3] == keys and len(longer) == 5
    # A change in the first block changes every key after it.
    changed = prefix_routing_keys([99] + prompt[1:], 16)
    assert not set(changed) & set(keys)
    assert prefix_routing_keys(prompt, 16, max_blocks=2) == keys[:2]


def test_a_salt_gives_the_same_prompt_other_keys():
    prompt = list(range(64))
    assert not set(prefix_routing_keys(prompt, 16, "tenant-a")) & set(prefix_routing_keys(prompt, 16, "tenant-b"))
    assert prefix_routing_keys(prompt, 16, "tenant-a") == prefix_routing_keys(prompt, 16, "tenant-a")


def test_lookup_finds_the_owner_of_the_longest_remembered_prefix_among_the_allowed():
    affinity = PrefixAffinity()
    conversation = list(range(200))
    short = prefix_routing_keys(conversation[:64], 16)
    long = prefix_routing_keys(conversation, 16)
    affinity.record(long, "b")
    affinity.record(short, "a")  # a request with only the start went to a: both hold the start
    assert affinity.lookup(long) == ("b", len(long))
    assert affinity.lookup(long, allowed={"a"}) == ("a", len(short))
    assert affinity.lookup(prefix_routing_keys(list(range(500, 600)), 16)) == (None, 0)
    affinity.forget("b")
    assert affinity.lookup(long) == ("a", len(short))


def test_the_table_forgets_the_least_recently_used_keys_first():
    affinity = PrefixAffinity(max_keys=4)
    first, second = prefix_routing_keys(list(range(32)), 16), prefix_routing_keys(list(range(50, 82)), 16)
    affinity.record(first, 1)
    affinity.record(second, 2)
    affinity.record(first, 1)  # used again: second is now the oldest
    affinity.record(prefix_routing_keys(list(range(90, 122)), 16), 3)
    assert len(affinity) == 4
    assert affinity.lookup(second) == (None, 0) and affinity.lookup(first) == (1, 2)
