"""fastpath.balancer: xxhash32 and the four balancing algorithms, no sockets."""
from __future__ import annotations

import math
import os
import random
from collections import Counter

import pytest
import xxhash

from fastpath.balancer import ALGORITHMS, Balancer, xxhash32

THREE = [("10.0.0.1", 8080, 100), ("10.0.0.2", 8080, 50), ("10.0.0.3", 8080, 10)]
TEN = [(f"10.0.1.{i}", 9000 + i, 100) for i in range(10)]
KEYS = [f"user-{k}" for k in range(10_000)]


def shares(counts: Counter[int], total: int, n: int) -> list[float]:
    return [counts[i] / total for i in range(n)]


def expected_shares(targets: list[tuple[str, int, int]]) -> list[float]:
    weight = sum(w for _, _, w in targets)
    return [w / weight for _, _, w in targets]


# ---------------------------------------------------------------- xxhash32

@pytest.mark.parametrize(("data", "digest"), [(b"", 0x02CC5D05), (b"a", 0x550D7456), (b"abc", 0x32D153FF)])
def test_xxhash32_known_vectors(data: bytes, digest: int) -> None:
    assert xxhash32(data) == digest
    assert xxhash32(data, 0) == digest


def test_xxhash32_matches_reference_library_on_random_inputs() -> None:
    rng = random.Random(20240601)
    # every length up to a few stripes, so each tail path (16-byte stripes, 4-byte words, bytes) runs
    for length in list(range(0, 70)) + [rng.randrange(70, 5000) for _ in range(200)]:
        data = rng.randbytes(length)
        seed = rng.choice([0, 1, 0xFFFFFFFF, rng.getrandbits(32)])
        assert xxhash32(data, seed) == xxhash.xxh32_intdigest(data, seed), (length, seed)


def test_xxhash32_accepts_other_buffers() -> None:
    data = os.urandom(37)
    assert xxhash32(bytearray(data)) == xxhash.xxh32_intdigest(data)
    assert xxhash32(memoryview(data)[5:30]) == xxhash.xxh32_intdigest(data[5:30])
    assert xxhash32(memoryview(b"")) == xxhash.xxh32_intdigest(b"")


def test_xxhash32_rejects_text_and_bad_seeds() -> None:
    with pytest.raises(TypeError):
        xxhash32("abc")  # type: ignore[arg-type]
    with pytest.raises(OverflowError):
        xxhash32(b"abc", -1)
    with pytest.raises(OverflowError):
        xxhash32(b"abc", 1 << 32)


# ---------------------------------------------------------------- construction

def test_constructor_keeps_targets_and_weights() -> None:
    balancer = Balancer([list(t) for t in THREE], "round-robin", seed=1)  # type: ignore[misc]
    assert balancer.targets == tuple(THREE)
    assert balancer.total_weight == 160
    assert balancer.available_weight == 160
    assert balancer.algorithm == "round-robin"
    with pytest.raises(AttributeError):
        balancer.targets = ()  # type: ignore[misc]
    assert ALGORITHMS == ("round-robin", "consistent-hashing", "least-connections", "latency")


@pytest.mark.parametrize("algorithm", ["", "random", "ROUND-ROBIN", "least_connections"])
def test_unknown_algorithm_is_rejected(algorithm: str) -> None:
    with pytest.raises(ValueError, match="algorithm"):
        Balancer(THREE, algorithm)


@pytest.mark.parametrize("weight", [-1, 65536, 1.5, "10", None])
def test_bad_weight_is_rejected(weight: object) -> None:
    with pytest.raises(ValueError, match="weight"):
        Balancer([("10.0.0.1", 80, 100), ("10.0.0.2", 80, weight)])  # type: ignore[list-item]


@pytest.mark.parametrize("target", [("10.0.0.1", 80), ("", 80, 1), ("h", -1, 1), ("h", "80", 1), 42])
def test_malformed_target_is_rejected(target: object) -> None:
    with pytest.raises(ValueError):
        Balancer([target])  # type: ignore[list-item]


@pytest.mark.parametrize("slots", [0, -5, 65537, 1.5, True])
def test_bad_slots_are_rejected(slots: object) -> None:
    with pytest.raises(ValueError, match="slots"):
        Balancer(THREE, "consistent-hashing", slots=slots)


def test_repr_is_readable() -> None:
    balancer = Balancer(THREE, seed=3)
    balancer.set_available(2, False)
    # weights 100/50/10 have gcd 10: 10 + 5 + 1 wheel entries
    assert repr(balancer) == "<Balancer round-robin targets=3 available=2 wheel=16>"
    assert repr(Balancer(THREE, "consistent-hashing", slots=500)).startswith(
        "<Balancer consistent-hashing targets=3 available=3 ring=1000 points=")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_no_targets_and_zero_weight_give_no_peer(algorithm: str) -> None:
    assert Balancer([], algorithm).pick() == -1
    zero = Balancer([("10.0.0.1", 80, 0), ("10.0.0.2", 80, 0)], algorithm)
    assert zero.total_weight == 0
    assert zero.pick(hash_value="k") == -1


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_index_arguments_are_checked(algorithm: str) -> None:
    balancer = Balancer(THREE, algorithm)
    for bad in (-1, 3):
        with pytest.raises(IndexError):
            balancer.set_available(bad, False)
        with pytest.raises(IndexError):
            balancer.is_available(bad)
        with pytest.raises(IndexError):
            balancer.release(bad)
        with pytest.raises(IndexError):
            balancer.observe(bad, 0.1, 1.0)


# ---------------------------------------------------------------- every algorithm

@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_weight_zero_is_never_picked(algorithm: str) -> None:
    targets = [("10.0.0.1", 80, 0), ("10.0.0.2", 80, 10), ("10.0.0.3", 80, 0), ("10.0.0.4", 80, 5)]
    balancer = Balancer(targets, algorithm, seed=5)
    picked = Counter(balancer.pick(hash_value=key) for key in KEYS[:3000])
    assert set(picked) == {1, 3}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_unavailable_targets_are_skipped_and_come_back(algorithm: str) -> None:
    balancer = Balancer(THREE, algorithm, seed=9)
    balancer.set_available(0, False)
    assert not balancer.is_available(0)
    assert balancer.available_weight == 60
    picked = Counter(balancer.pick(hash_value=key) for key in KEYS[:3000])
    assert 0 not in picked and set(picked) <= {1, 2} and picked
    balancer.set_available(1, False)
    balancer.set_available(2, False)
    assert balancer.available_weight == 0
    assert balancer.pick(hash_value="k") == -1
    balancer.set_available(0, True)
    balancer.set_available(0, True)  # idempotent: the weight is counted once
    assert balancer.available_weight == 100
    assert {balancer.pick(hash_value=key) for key in KEYS[:500]} == {0}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_retry_never_returns_an_excluded_target_while_others_remain(algorithm: str) -> None:
    balancer = Balancer(THREE, algorithm, seed=11)
    for failed in range(3):
        for key in KEYS[:400]:
            chosen = balancer.pick({failed}, key)
            assert chosen not in (failed, -1)
            balancer.release(chosen)
    for kept in range(3):
        excluded = {0, 1, 2} - {kept}
        for key in KEYS[:200]:
            assert balancer.pick(excluded, key) == kept
            balancer.release(kept)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_all_excluded_picks_among_available_as_if_nothing_were_excluded(algorithm: str) -> None:
    balancer = Balancer(THREE, algorithm, seed=13)
    every = {0, 1, 2}
    assert {balancer.pick(every, key) for key in KEYS[:1000]} <= every
    assert -1 not in {balancer.pick(every, key) for key in KEYS[:1000]}
    # target 2 is down and the other two already failed: retry one of those, never the down one
    balancer.set_available(2, False)
    picked = {balancer.pick({0, 1}, key) for key in KEYS[:1000]}
    assert picked and picked <= {0, 1}
    # indices that are not targets are ignored
    assert balancer.pick({7, -3}, "k") in (0, 1)


def test_exclusion_must_hold_integers() -> None:
    with pytest.raises(TypeError):
        Balancer(THREE).pick({"10.0.0.1"})


# ---------------------------------------------------------------- round-robin

@pytest.mark.parametrize(("weights", "lap"), [((100, 50, 10), (10, 5, 1)), ((3, 1), (3, 1)), ((7, 7, 7), (1, 1, 1))])
def test_round_robin_every_lap_holds_weight_over_gcd_of_each(weights: tuple[int, ...], lap: tuple[int, ...]) -> None:
    targets = [(f"10.0.2.{i}", 80, w) for i, w in enumerate(weights)]
    balancer = Balancer(targets, seed=17)
    size = sum(lap)
    sequence = [balancer.pick() for _ in range(size * 20)]
    # the wheel repeats, and any window of one lap holds each target weight/gcd times
    assert sequence[:size] * 20 == sequence
    for start in range(size):
        window = Counter(sequence[start:start + size])
        assert [window[i] for i in range(len(weights))] == list(lap)


@pytest.mark.parametrize("weights", [(100, 50, 10), (3, 1), (65535, 1, 30000)])
def test_round_robin_distribution_follows_weights(weights: tuple[int, ...]) -> None:
    targets = [(f"10.0.3.{i}", 80, w) for i, w in enumerate(weights)]
    balancer = Balancer(targets, seed=19)
    total = 100_000
    got = shares(Counter(balancer.pick() for _ in range(total)), total, len(weights))
    for have, want in zip(got, expected_shares(targets)):
        assert have == pytest.approx(want, abs=0.01)


def test_round_robin_shuffle_depends_on_the_seed_only() -> None:
    targets = [(f"10.0.4.{i}", 80, 1) for i in range(12)]

    def sequence(seed: int | None) -> list[int]:
        balancer = Balancer(targets, seed=seed)
        return [balancer.pick() for _ in range(12)]

    assert sequence(23) == sequence(23)
    orders = {tuple(sequence(seed)) for seed in range(8)}
    assert len(orders) > 1
    assert sorted(sequence(None)) == list(range(12))


def test_round_robin_skipping_keeps_the_proportions_of_the_rest() -> None:
    balancer = Balancer(THREE, seed=29)
    balancer.set_available(0, False)
    sequence = [balancer.pick() for _ in range(6 * 50)]
    counts = Counter(sequence)
    assert counts == Counter({1: 250, 2: 50})


# ---------------------------------------------------------------- consistent-hashing

def kong_continuum(targets: list[tuple[str, int, int]], slots: int) -> tuple[int, dict[int, int]]:
    """Kong's Ketama continuum written out plainly, with the reference xxhash library."""
    size = slots if slots >= 1000 else 1000
    weighted = sorted((host, port, index) for index, (host, port, w) in enumerate(targets) if w > 0)
    total = sum(w for _, _, w in targets)
    continuum: dict[int, int] = {}
    for host, port, index in weighted:
        entries = max(1, math.floor(targets[index][2] / total * len(weighted) * 160))
        attempt = 1
        while entries:
            slot = xxhash.xxh32_intdigest(f"{host}::{port} {attempt}".encode()) % size
            if slot not in continuum:
                continuum[slot] = index
                entries -= 1
            attempt += 1
    return size, continuum


def kong_lookup(size: int, continuum: dict[int, int], value: str, available: set[int]) -> int:
    slot = xxhash.xxh32_intdigest(value.encode()) % size
    for _ in range(size):
        owner = continuum.get(slot)
        if owner is not None and owner in available:
            return owner
        slot = slot - 1 if slot > 0 else size - 1  # counter-clockwise
    return -1


@pytest.mark.parametrize("slots", [10000, 500, 4096])
def test_hashing_matches_kongs_continuum(slots: int) -> None:
    targets = [("10.0.5.2", 80, 100), ("10.0.5.1", 8080, 30), ("b.example", 443, 1),
               ("10.0.5.1", 80, 250), ("a.example", 443, 0)]
    balancer = Balancer(targets, "consistent-hashing", slots=slots)
    size, continuum = kong_continuum(targets, slots)
    assert f"ring={size} points={len(continuum)}>" in repr(balancer)
    available = {0, 1, 2, 3}
    for key in KEYS[:3000]:
        assert balancer.pick(hash_value=key) == kong_lookup(size, continuum, key, available)
    balancer.set_available(3, False)
    for key in KEYS[:3000]:
        assert balancer.pick(hash_value=key) == kong_lookup(size, continuum, key, available - {3})


def test_hashing_is_stable_and_independent_of_target_order() -> None:
    first = Balancer(TEN, "consistent-hashing")
    shuffled = TEN[:]
    random.Random(31).shuffle(shuffled)
    second = Balancer(shuffled, "consistent-hashing")
    for key in KEYS[:2000]:
        chosen = first.pick(hash_value=key)
        assert first.pick(hash_value=key) == chosen
        assert shuffled[second.pick(hash_value=key)] == TEN[chosen]


def test_hashing_distribution_follows_weights() -> None:
    balancer = Balancer(THREE, "consistent-hashing")
    total = 20_000
    got = shares(Counter(balancer.pick(hash_value=f"client-{k}") for k in range(total)), total, 3)
    for have, want in zip(got, expected_shares(THREE)):
        assert have == pytest.approx(want, abs=0.03)


def assignment(targets: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    balancer = Balancer(targets, "consistent-hashing")
    return [targets[balancer.pick(hash_value=key)] for key in KEYS]


def test_removing_the_last_sorted_target_moves_only_its_keys() -> None:
    before = assignment(TEN)
    removed = max(TEN)
    after = assignment([t for t in TEN if t != removed])
    moved = [i for i in range(len(KEYS)) if before[i] != after[i]]
    assert all(before[i] == removed for i in moved)
    assert len(moved) == before.count(removed)
    assert len(moved) / len(KEYS) == pytest.approx(1 / len(TEN), abs=0.04)


@pytest.mark.parametrize("removed", range(len(TEN)))
def test_removing_any_target_moves_about_one_in_n_keys(removed: int) -> None:
    before = assignment(TEN)
    after = assignment(TEN[:removed] + TEN[removed + 1:])
    moved = [i for i in range(len(KEYS)) if before[i] != after[i]]
    assert len(moved) / len(KEYS) == pytest.approx(1 / len(TEN), abs=0.04)
    # every key of the removed target moves; a few others follow only because a point the
    # removed target had won in a collision now goes to the target it beat (Kong does the same)
    assert before.count(TEN[removed]) == sum(before[i] == TEN[removed] for i in moved)
    assert sum(before[i] != TEN[removed] for i in moved) / len(KEYS) < 0.02


def test_unavailable_target_keys_move_and_come_back() -> None:
    balancer = Balancer(TEN, "consistent-hashing")
    before = [balancer.pick(hash_value=key) for key in KEYS]
    balancer.set_available(4, False)
    during = [balancer.pick(hash_value=key) for key in KEYS]
    for old, new in zip(before, during):
        assert new == old if old != 4 else new != 4
    assert 4 in before
    balancer.set_available(4, True)
    assert [balancer.pick(hash_value=key) for key in KEYS] == before


def test_hash_of_none_empty_and_bytes_agree() -> None:
    balancer = Balancer(TEN, "consistent-hashing")
    chosen = balancer.pick(hash_value="")
    assert balancer.pick() == chosen
    assert balancer.pick(hash_value=None) == chosen
    assert balancer.pick(hash_value=b"") == chosen
    size, continuum = kong_continuum(TEN, 10000)
    assert chosen == kong_lookup(size, continuum, "", set(range(10)))
    for key in ("ключ-1", "user-42", "192.168.0.7"):
        assert balancer.pick(hash_value=key) == balancer.pick(hash_value=key.encode())
    # anything else hashes as its text, like Kong's tostring()
    assert balancer.pick(hash_value=12345) == balancer.pick(hash_value="12345")


def test_hashing_with_more_targets_than_the_ring_fits_still_uses_every_target() -> None:
    # 100 targets * 160 points would not fit 10000 slots; Kong gives up, we scale down
    targets = [(f"10.1.{i // 250}.{i % 250}", 80, 100) for i in range(100)]
    balancer = Balancer(targets, "consistent-hashing", slots=10000)
    counts = Counter(balancer.pick(hash_value=f"k{k}") for k in range(20_000))
    assert set(counts) == set(range(100))
    assert max(counts.values()) < 3 * 20_000 / 100


# ---------------------------------------------------------------- least-connections

def test_least_connections_without_releases_follows_weights() -> None:
    targets = [("10.0.6.1", 80, 3), ("10.0.6.2", 80, 1)]
    balancer = Balancer(targets, "least-connections")
    counts = Counter(balancer.pick() for _ in range(400))
    assert abs(counts[0] - 300) <= 1 and abs(counts[1] - 100) <= 1


def test_least_connections_balances_in_flight_counts_with_release() -> None:
    targets = [("10.0.6.1", 80, 10), ("10.0.6.2", 80, 10), ("10.0.6.3", 80, 10)]
    balancer = Balancer(targets, "least-connections")
    in_flight: Counter[int] = Counter(balancer.pick() for _ in range(9))
    assert in_flight == Counter({0: 3, 1: 3, 2: 3})
    # target 1 finishes two requests: the next two go there
    balancer.release(1)
    balancer.release(1)
    assert [balancer.pick(), balancer.pick()] == [1, 1]
    # a long-running target keeps its load while the others churn
    rng = random.Random(37)
    active = {0: 3, 1: 3, 2: 3}
    for _ in range(3000):
        chosen = balancer.pick()
        active[chosen] += 1
        finished = rng.choice([1, 2])  # target 0 never finishes anything
        if active[finished]:
            balancer.release(finished)
            active[finished] -= 1
    assert active[0] <= 4
    assert max(active[1], active[2]) <= active[0] + 1


def test_least_connections_shares_ties_in_turn() -> None:
    balancer = Balancer(TEN, "least-connections")
    picked = []
    for _ in range(100):
        chosen = balancer.pick()
        picked.append(chosen)
        balancer.release(chosen)
    assert Counter(picked) == Counter({i: 10 for i in range(10)})


def test_least_connections_release_never_goes_negative() -> None:
    balancer = Balancer(THREE[:2], "least-connections")
    for _ in range(5):
        balancer.release(0)  # more releases than picks must not bank credit for target 0
    counts = Counter(balancer.pick() for _ in range(300))
    assert abs(counts[0] - 200) <= 1 and abs(counts[1] - 100) <= 1


def test_release_is_harmless_for_other_algorithms() -> None:
    balancer = Balancer(THREE, "round-robin", seed=41)
    reference = Balancer(THREE, "round-robin", seed=41)
    for _ in range(50):
        balancer.release(balancer.pick())
    assert [balancer.pick() for _ in range(32)] == [reference.pick() for _ in range(50 + 32)][50:]


# ---------------------------------------------------------------- latency

TWO = [("10.0.7.1", 80, 1), ("10.0.7.2", 80, 1)]


def test_latency_prefers_the_low_rtt_target() -> None:
    balancer = Balancer(TWO, "latency")
    balancer.observe(0, 0.100, 1.0)
    balancer.observe(1, 0.010, 1.0)
    assert {balancer.pick() for _ in range(100)} == {1}


def test_latency_score_divides_by_weight() -> None:
    balancer = Balancer([("10.0.7.1", 80, 1), ("10.0.7.2", 80, 2)], "latency")
    balancer.observe(0, 0.010, 1.0)
    balancer.observe(1, 0.015, 1.0)  # 0.015 / 2 < 0.010 / 1
    assert balancer.pick() == 1
    balancer.observe(1, 0.030, 1.0)  # no time passed: w = 1, the EWMA stays at 0.015
    assert balancer.pick() == 1


@pytest.mark.parametrize("margin", [0.99, 1.01])
def test_latency_ewma_decays_with_time_between_samples(margin: float) -> None:
    balancer = Balancer(TWO, "latency")
    balancer.observe(0, 0.100, 0.0)
    balancer.observe(0, 0.300, 10.0)
    w = math.exp(-10.0 / 10.0)
    predicted = 0.100 * w + 0.300 * (1 - w)
    balancer.observe(1, predicted * margin, 10.0)
    assert balancer.pick() == (1 if margin < 1 else 0)


def test_latency_idle_target_is_tried_again_as_its_score_ages() -> None:
    balancer = Balancer(TWO, "latency")
    balancer.observe(0, 0.050, 0.0)
    balancer.observe(1, 0.020, 0.0)
    assert balancer.pick() == 1
    now = 0.0
    while balancer.pick() == 1:
        now += 1.0
        balancer.observe(1, 0.020, now)
        assert now < 60
    # target 0 comes back once 0.050 * exp(-t/10) drops under 0.020, after about 9.2 s
    assert now == math.ceil(10 * math.log(0.050 / 0.020))


def test_latency_new_target_starts_at_the_average() -> None:
    targets = [("10.0.8.1", 80, 1), ("10.0.8.2", 80, 1), ("10.0.8.3", 80, 1)]
    balancer = Balancer(targets, "latency")
    assert sorted(balancer.pick() for _ in range(3)) == [0, 1, 2]  # no samples: all tried in turn
    balancer.observe(0, 0.010, 1.0)
    balancer.observe(1, 0.030, 1.0)
    assert balancer.pick() == 0
    # without target 0 the newcomer (average 0.020) beats target 1 (0.030) ...
    assert balancer.pick({0}) == 2
    # ... and once it is measured it competes on its own numbers
    balancer.observe(2, 0.050, 1.0)
    assert balancer.pick({0}) == 1


def test_latency_observe_rejects_bad_rtt() -> None:
    balancer = Balancer(TWO, "latency")
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError):
            balancer.observe(0, bad, 1.0)
