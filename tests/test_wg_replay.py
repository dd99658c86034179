"""The replay window (paper 5.4.6, RFC 6479) against a plain set-based model."""

from __future__ import annotations

import random
import time

import pytest

from gtun.core.wg.constants import REJECT_AFTER_MESSAGES, REPLAY_WINDOW_SIZE
from gtun.core.wg.replay import ReplayWindow


class SetModel:
    """The specification: accept a counter below REJECT_AFTER_MESSAGES that was never
    accepted and that is newer than (newest - size)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.seen: set[int] = set()
        self.top = -1

    def would_accept(self, counter: int) -> bool:
        if counter >= REJECT_AFTER_MESSAGES or counter in self.seen:
            return False
        return counter > self.top - self.size

    def accept(self, counter: int) -> bool:
        if not self.would_accept(counter):
            return False
        self.seen.add(counter)
        self.top = max(self.top, counter)
        return True


def test_default_size() -> None:
    assert ReplayWindow().size == REPLAY_WINDOW_SIZE
    assert ReplayWindow(64).size == 64


def test_in_order() -> None:
    w = ReplayWindow()
    for c in range(20_000):
        assert w.would_accept(c)
        assert w.accept(c)
        assert not w.would_accept(c)


def test_would_accept_does_not_record() -> None:
    w = ReplayWindow()
    assert w.would_accept(5)
    assert w.would_accept(5)
    assert w.accept(5)
    assert not w.accept(5)


def test_out_of_order_within_window() -> None:
    w = ReplayWindow()
    order = list(range(1000))
    random.Random(1).shuffle(order)
    for c in order:
        assert w.accept(c), c
    for c in range(1000):
        assert not w.accept(c)


def test_duplicates_rejected() -> None:
    w = ReplayWindow()
    for c in (0, 1, 2, 10, 5, 7):
        assert w.accept(c)
    for c in (0, 1, 2, 10, 5, 7):
        assert not w.would_accept(c)
        assert not w.accept(c)
    # The gaps are still open.
    for c in (3, 4, 6, 8, 9):
        assert w.accept(c)


def test_window_edge() -> None:
    size = REPLAY_WINDOW_SIZE
    w = ReplayWindow()
    top = 100_000
    assert w.accept(top)
    assert not w.would_accept(top - size)  # just outside
    assert w.would_accept(top - size + 1)  # oldest counter still inside
    assert w.accept(top - size + 1)
    assert not w.accept(top - size + 1)
    assert w.accept(top - 1)


def test_too_old_rejected() -> None:
    w = ReplayWindow()
    assert w.accept(50_000)
    for c in (0, 1, 50_000 - REPLAY_WINDOW_SIZE, 50_000 - 2 * REPLAY_WINDOW_SIZE):
        assert not w.would_accept(c)
        assert not w.accept(c)


def test_counter_zero_first() -> None:
    w = ReplayWindow()
    assert w.accept(0)
    assert not w.accept(0)
    assert w.accept(1)


@pytest.mark.parametrize("jump", [REPLAY_WINDOW_SIZE + 10, 1 << 20, 1 << 40, 1 << 62])
def test_huge_jump(jump: int) -> None:
    """A jump larger than the window slides it all the way and must stay cheap: the
    counter is chosen by the (authenticated) peer, up to 2^64."""
    w = ReplayWindow()
    assert w.accept(0)
    assert w.accept(1)
    started = time.perf_counter()
    assert w.accept(jump)
    assert w.accept(jump + 1)
    assert time.perf_counter() - started < 0.05
    assert not w.accept(jump)
    assert not w.accept(0)
    assert not w.accept(1)
    assert not w.accept(jump + 1 - REPLAY_WINDOW_SIZE)  # top is jump + 1 now
    assert w.accept(jump - 1)
    assert w.accept(jump + 2 - REPLAY_WINDOW_SIZE)


def test_huge_first_counter() -> None:
    w = ReplayWindow()
    assert w.accept(REJECT_AFTER_MESSAGES - 1)
    assert not w.accept(REJECT_AFTER_MESSAGES - 1)
    assert w.accept(REJECT_AFTER_MESSAGES - 2)


def test_reject_after_messages() -> None:
    w = ReplayWindow()
    assert not w.would_accept(REJECT_AFTER_MESSAGES)
    assert not w.accept(REJECT_AFTER_MESSAGES)
    assert not w.accept((1 << 64) - 1)
    assert w.accept(REJECT_AFTER_MESSAGES - 1)
    assert not w.accept(REJECT_AFTER_MESSAGES)


@pytest.mark.parametrize("far", [False, True], ids=["near", "far"])
@pytest.mark.parametrize("size", [1, 2, 64, 100, REPLAY_WINDOW_SIZE])
@pytest.mark.parametrize("seed", range(3))
def test_randomized_against_set_model(size: int, seed: int, far: bool) -> None:
    """`far` adds jumps up to and past REJECT_AFTER_MESSAGES."""
    rng = random.Random(seed * 1000 + size)
    w = ReplayWindow(size)
    model = SetModel(size)
    top = 0
    for _ in range(3000):
        roll = rng.random()
        if roll < 0.5:  # near the top: in order, reordered, duplicated
            c = max(0, top + rng.randint(-2 * size - 2, 3))
        elif roll < 0.8:  # around the window's edge
            c = max(0, top - size + rng.randint(-3, 3))
        elif roll < 0.95:  # a forward jump
            c = top + rng.randint(1, 4 * size + 10)
        elif not far:
            c = rng.randint(0, 1 << 20)
        else:  # far away, including past REJECT_AFTER_MESSAGES
            c = rng.choice(
                [0, rng.randint(0, 1 << 20), REJECT_AFTER_MESSAGES - 1 - rng.randint(0, size)]
            )
            if c >= REJECT_AFTER_MESSAGES - 2 * size:
                c = rng.choice([c, REJECT_AFTER_MESSAGES, (1 << 64) - 1])
        assert w.would_accept(c) == model.would_accept(c), (c, model.top)
        assert w.accept(c) == model.accept(c), (c, model.top)
        top = max(model.top, 0)
