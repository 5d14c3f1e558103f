import logging

from web.throttle import FailedAuth


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_an_address_is_throttled_after_its_failures_and_free_again_after_the_window():
    clock = Clock()
    guard = FailedAuth("status token", max_failures=3, window_s=60, clock=clock)
    for _ in range(3):
        assert guard.retry_after("10.0.0.1") is None
        guard.failed("10.0.0.1")
    assert guard.retry_after("10.0.0.1") == 61
    assert guard.retry_after("10.0.0.2") is None  # others are not punished
    clock.now += 30
    assert guard.retry_after("10.0.0.1") == 31
    clock.now += 31
    assert guard.retry_after("10.0.0.1") is None
    assert guard.refused_total == 3 and guard.throttled_total == 2


def test_repeats_are_one_line_per_window_and_never_the_credential(caplog):
    clock = Clock()
    guard = FailedAuth("ops token", max_failures=1000, window_s=60, clock=clock)
    with caplog.at_level(logging.WARNING, logger="pdm.auth"):
        for _ in range(500):
            guard.failed("192.0.2.7")
        clock.now += 61
        guard.failed("192.0.2.7")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["refused ops token from 192.0.2.7", "refused ops token from 192.0.2.7 499 more times in 60 s",
                     "refused ops token from 192.0.2.7"]


def test_memory_is_bounded_by_the_number_of_addresses():
    guard = FailedAuth("x", max_addresses=100, clock=Clock())
    for i in range(10_000):
        guard.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(guard._windows) == 100
