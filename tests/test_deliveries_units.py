"""The pure parts of delivery: event filters, the retry schedule, Retry-After, secrets at rest."""

from __future__ import annotations

import random
from email.utils import formatdate

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.deliveries import schedule
from relay.deliveries.handler import PARK_MAX, park_delay
from relay.deliveries.models import matches
from relay.deliveries.secrets import SecretBox, SecretsError, task_webhook_secret
from relay.signing import secret_bytes


@pytest.mark.parametrize("patterns,event,expected", [
    (None, "task.progress", True),
    (["*"], "task.failed", True),
    (["task.*"], "task.succeeded", True),
    (["task.succeeded"], "task.succeeded", True),
    (["task.succeeded", "task.failed"], "task.queued", False),
    (["task.*"], "image.archived", False),
])
def test_filters(patterns: list[str] | None, event: str, expected: bool) -> None:
    """None and * take everything; task.* takes every task event; exact types take only themselves."""
    assert matches(patterns, event) is expected


def test_default_schedule_with_jitter_stays_within_twenty_percent() -> None:
    """Each retry waits its scheduled base ±20 %; after the 8th attempt the delivery is exhausted."""
    rng = random.Random(7)
    base = schedule.DEFAULT_SCHEDULE
    for done in range(1, len(base)):
        for _ in range(50):
            delay = schedule.next_delay(done, base, 0.2, rng=rng)
            assert delay is not None and base[done] * 0.8 <= delay <= base[done] * 1.2
    assert schedule.next_delay(len(base), base, 0.2) is None
    assert schedule.first_delay(base, 0.2) == 0.0


def test_retry_after_is_clamped_between_the_schedule_and_twice_it() -> None:
    """Retry-After slows a retry down to at most 2x its base; it never makes it sooner."""
    sched = (0.0, 5.0, 300.0)
    assert schedule.next_delay(1, sched, 0.0, retry_after=7) == 7
    assert schedule.next_delay(1, sched, 0.0, retry_after=3600) == 10
    assert schedule.next_delay(1, sched, 0.0, retry_after=1) == 5
    assert schedule.next_delay(2, sched, 0.0, retry_after=500) == 500


def test_retry_after_parses_seconds_and_http_dates() -> None:
    """Retry-After is delta-seconds or an HTTP date; junk is ignored."""
    now = 1_790_000_000.0
    assert schedule.parse_retry_after("120", now) == 120
    assert schedule.parse_retry_after(formatdate(now + 60, usegmt=True), now) == pytest.approx(60, abs=1)
    assert schedule.parse_retry_after(formatdate(now - 60, usegmt=True), now) == 0
    assert schedule.parse_retry_after("soon", now) is None and schedule.parse_retry_after(None, now) is None


@pytest.mark.parametrize("value", ["²", "1²", "١٢", "٣", "①", "12 ", "\u00a0", "Fri, 31 Dec 99999 23:59:59 GMT",
                                   "Mon, 32 Jan 2026 00:00:00 GMT", "Thu, 01 Jan 1970 00:00:00 +9999"])
def test_retry_after_junk_is_ignored_never_raised(value: str) -> None:
    """Only ASCII digits are delta-seconds ("²" and other scripts' digits pass str.isdigit()); junk is None."""
    result = schedule.parse_retry_after(value, 1_790_000_000.0)
    assert result is None or (value.strip().isascii() and result >= 0), (value, result)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.one_of(st.text(max_size=40), st.from_regex(r"\A\s*\d{1,6}\s*\Z"),
                 st.sampled_from(["9" * 5000, "1e400", "-5", "0x10", "inf", "nan"])))
def test_retry_after_never_raises(value: str) -> None:
    """Any header text ends in a non-negative delay or None."""
    result = schedule.parse_retry_after(value, 1_790_000_000.0)
    assert result is None or result >= 0


@pytest.mark.parametrize("status,outcome", [(200, "succeeded"), (204, "succeeded"), (410, "gone"), (301, "retry"),
                                            (404, "retry"), (429, "retry"), (500, "retry"), (None, "retry")])
def test_classify(status: int | None, outcome: str) -> None:
    """2xx succeeds, 410 is gone, everything else (redirects included, no answer) is retried."""
    assert schedule.classify(status) == outcome
    assert schedule.classify(status, blocked=True) == "refused"     # the SSRF guard: never retried


def test_park_delay_grows_and_is_capped() -> None:
    """A parked delivery looks again by itself a little later each time, at most 30 s (x1.5)."""
    assert park_delay(0) <= 0.075
    assert all(park_delay(n) <= PARK_MAX * 1.5 for n in range(40))


def test_secret_box_round_trip_bound_to_its_row() -> None:
    """A sealed secret opens with the same key and row id only; the clear text is not in the token."""
    box = SecretBox("k" * 32)
    token = box.encrypt("whsec_abc", bound_to="sub_1")
    assert "whsec_abc" not in token and token.startswith("enc1:")
    assert box.decrypt(token, bound_to="sub_1") == "whsec_abc"
    with pytest.raises(SecretsError):
        box.decrypt(token, bound_to="sub_2")
    with pytest.raises(SecretsError, match="unknown key"):
        SecretBox("x" * 32).decrypt(token, bound_to="sub_1")
    tampered = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    with pytest.raises(SecretsError):
        box.decrypt(tampered, bound_to="sub_1")
    assert "whsec" not in repr(box) and "k" * 32 not in repr(box)


def test_previous_keys_still_decrypt_but_only_the_current_encrypts() -> None:
    """After changing the encryption key, listing the old one keeps old rows readable."""
    old = SecretBox("old-key-" * 4)
    token = old.encrypt("whsec_x", bound_to="sub_1")
    new = SecretBox("new-key-" * 4, ["old-key-" * 4])
    assert new.decrypt(token, bound_to="sub_1") == "whsec_x"
    assert new.encrypt("y", bound_to="s").split(":")[1] != token.split(":")[1]


def test_task_webhook_secret_is_derived_stably_or_configured() -> None:
    """With no configured secret one is derived from the signing secret (same input, same secret)."""
    derived = task_webhook_secret("", "s" * 40)
    assert derived == task_webhook_secret("", "s" * 40) != task_webhook_secret("", "t" * 40)
    assert len(secret_bytes(derived)) == 32
    assert task_webhook_secret("whsec_configured", "s" * 40) == "whsec_configured"


async def test_lanes_cap_wait_for_quick_keys_and_park_slow_ones() -> None:
    """At the cap, a quick key's delivery waits for a freed slot; a slow or failing key's is parked at once."""
    import asyncio

    from relay.deliveries.lanes import Lanes
    lanes = Lanes(fast_ms=100, wait_seconds=30)      # the waiter must still be waiting however slow the machine
    assert await lanes.acquire("k", 1) and lanes.in_flight("k") == 1
    waiter = asyncio.create_task(lanes.acquire("k", 1))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    await lanes.release("k", latency_ms=5)
    assert await waiter and lanes.in_flight("k") == 1
    assert not await lanes.acquire("k", 1, may_wait=False)       # failing subscriber: never waits
    await lanes.release("k", latency_ms=5000)                     # now known to be slow
    assert await lanes.acquire("k", 1)
    assert not await lanes.acquire("k", 1)                        # slow: parked without waiting
    await lanes.release("k")
    assert lanes.in_flight("k") == 0


async def test_a_freed_lane_is_handed_to_the_oldest_parked_delivery() -> None:
    """Parked deliveries are remembered in order; each release hands its slot to the oldest one."""
    from relay.deliveries.lanes import Lanes
    lanes = Lanes(fast_ms=100)
    assert await lanes.acquire("k", 1, delivery_id="d0")
    for name in ("d1", "d2"):
        assert not await lanes.acquire("k", 1, may_wait=False, delivery_id=name)
        lanes.park("k", name)
    assert lanes.parked("k") == 2
    assert await lanes.release("k", latency_ms=5) == "d1"
    assert await lanes.acquire("k", 1, delivery_id="d2")      # d2 woke by its own timer first: no longer parked
    assert lanes.parked("k") == 0 and await lanes.release("k") is None


async def test_a_release_that_frees_a_waiter_still_wakes_the_oldest_parked_delivery() -> None:
    """A freed slot goes to the delivery waiting for it, and the oldest parked one is woken all the same, to take
    the waiter's place: woken only once nobody waited, it began its trip back through the job queue while the
    lane's slots stood empty (bench.fanout, one subscription)."""
    import asyncio

    from relay.deliveries.lanes import Lanes
    from tests.harness import wait_for
    lanes = Lanes(fast_ms=100, wait_seconds=30)      # the waiter must still be waiting however slow the machine
    assert await lanes.acquire("k", 1, delivery_id="d0")
    waiter = asyncio.create_task(lanes.acquire("k", 1, delivery_id="d1"))
    await wait_for(lambda: lanes._lanes["k"].waiting == 1, 10, "d1 to wait for the slot")
    assert not await lanes.acquire("k", 1, may_wait=False, delivery_id="d2") and lanes.park("k", "d2")
    assert await lanes.release("k", latency_ms=5) == "d2"
    assert await asyncio.wait_for(waiter, 10) and lanes.in_flight("k") == 1 and lanes.parked("k") == 0


async def test_a_woken_delivery_never_is_one_already_waiting_and_keeps_its_place_if_it_finds_no_room() -> None:
    """A parked delivery its own timer brought back to wait is no longer parked (a release never wakes a waiter);
    one woken to take a waiter's place that finds the room full again parks at the front, where it was."""
    import asyncio

    from relay.deliveries.lanes import Lanes
    from tests.harness import wait_for
    lanes = Lanes(fast_ms=100, wait_seconds=30)
    assert await lanes.acquire("k", 1, delivery_id="d0")
    for name in ("d1", "d2", "d3"):
        assert not await lanes.acquire("k", 1, may_wait=False, delivery_id=name) and lanes.park("k", name)
    waiter = asyncio.create_task(lanes.acquire("k", 1, delivery_id="d1"))      # d1's timer: it waits now
    await wait_for(lambda: lanes._lanes["k"].waiting == 1, 10, "d1 to wait for the slot")
    assert lanes.parked("k") == 2
    assert await lanes.release("k", latency_ms=5) == "d2"           # d1 gets the slot; d2 comes for its place
    assert await asyncio.wait_for(waiter, 10)
    other = asyncio.create_task(lanes.acquire("k", 1, delivery_id="d4"))      # a new delivery takes the room
    await wait_for(lambda: lanes._lanes["k"].waiting == 1, 10, "d4 to wait for the slot")
    assert not await lanes.acquire("k", 1, delivery_id="d2") and lanes.park("k", "d2")
    assert list(lanes._lanes["k"].parked) == ["d2", "d3"]           # back at the front
    assert await lanes.release("k", latency_ms=5) == "d2"           # d4 gets the slot; d2 is woken first again
    assert await asyncio.wait_for(other, 10)
    assert await lanes.release("k", latency_ms=5) == "d3"           # d4 done, nobody waits: the next parked


def test_deliveries_config_from_toml_and_environment(tmp_path: object) -> None:
    """[deliveries] keys load from TOML (schedule as a list) and RELAY_DELIVERIES_* (schedule as a comma list)."""
    from pathlib import Path

    from relay.config import load_settings
    assert isinstance(tmp_path, Path)
    defaults = load_settings(None, {}).deliveries
    assert defaults.schedule == schedule.DEFAULT_SCHEDULE and defaults.timeout == 15.0
    assert defaults.auto_disable_after == 5 * 86400 and defaults.rotation_overlap == 86400
    path = tmp_path / "relay.toml"
    path.write_text('[deliveries]\nschedule = [0, 1, 2.5]\njitter = 0.1\nencryption_key = "env:ENC"\n'
                    '[providers.evolink]\nbase_url = "https://api.evolink.ai"\napi_key = "k"\n')
    loaded = load_settings(path, {"ENC": "e" * 40, "RELAY_DELIVERIES_CONCURRENCY_PER_SUBSCRIPTION": "3"})
    assert loaded.deliveries.schedule == (0.0, 1.0, 2.5) and loaded.deliveries.jitter == 0.1
    assert loaded.deliveries.encryption_key == "e" * 40 and loaded.deliveries.concurrency_per_subscription == 3
    assert loaded.redacted()["deliveries"]["encryption_key"] == "***"
    assert "e" * 40 not in repr(loaded)
    env = load_settings(None, {"RELAY_DELIVERIES_SCHEDULE": "0, 5,60"})
    assert env.deliveries.schedule == (0.0, 5.0, 60.0)


@pytest.mark.parametrize("env,problem", [
    ({"RELAY_DELIVERIES_SCHEDULE": ""}, "deliveries.schedule"),
    ({"RELAY_DELIVERIES_SCHEDULE": "0,-1"}, "deliveries.schedule"),
    ({"RELAY_DELIVERIES_SCHEDULE": "0,soon"}, "deliveries.schedule"),
    ({"RELAY_DELIVERIES_JITTER": "1.5"}, "deliveries.jitter"),
    ({"RELAY_DELIVERIES_TIMEOUT": "0"}, "deliveries.timeout"),
    ({"RELAY_DELIVERIES_CONCURRENCY_PER_SUBSCRIPTION": "0"}, "deliveries.concurrency_per_subscription"),
    ({"RELAY_DELIVERIES_ENCRYPTION_KEY": "short"}, "deliveries.encryption_key"),
    ({"RELAY_DELIVERIES_TASK_WEBHOOK_SECRET": "whsec_nope!"}, "deliveries.task_webhook_secret"),
    ({"RELAY_DELIVERIES_RETRIES": "3"}, "deliveries.retries"),
])
def test_bad_deliveries_config_names_the_key(env: dict[str, str], problem: str) -> None:
    """Each invalid [deliveries] value is a ConfigError line naming its key, secrets not echoed."""
    from relay.config import ConfigError, load_settings
    with pytest.raises(ConfigError) as caught:
        load_settings(None, env)
    assert any(line.startswith(problem) for line in caught.value.problems), caught.value.problems
    assert "whsec_nope!" not in str(caught.value) and "short'" not in str(caught.value)


async def test_a_quick_lane_forgotten_while_idle_is_still_known_quick() -> None:
    """Idle quick lanes are forgotten (keys come and go) but their timing is kept: a process whose every attempt finds
    the store's slots held elsewhere is idle between them, and must still know its subscriber answers quickly."""
    from relay.deliveries.lanes import Lanes
    lanes = Lanes()
    assert lanes.quick("sub_Q") and not lanes.quick("sub_Q", unknown=False), "untimed"
    assert await lanes.acquire("sub_Q", 2)
    await lanes.release("sub_Q", latency_ms=5.0)
    assert lanes.in_flight("sub_Q") == 0 and lanes.quick("sub_Q", unknown=False)
    assert await lanes.acquire("sub_Q", 2)          # made again, its timing with it
    await lanes.release("sub_Q", latency_ms=2_000.0)
    assert not lanes.quick("sub_Q"), "0.7 * 5 + 0.3 * 2000 ms: slow"
