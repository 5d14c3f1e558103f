"""central/supervised.py: a background loop of the API process that dies is logged, counted and started again;
stop() ends it for good. The notification worker's own test drives it through the API
(tests/central/test_notify.py::test_a_worker_that_dies_is_logged_and_started_again)."""

import asyncio
import logging

from central.fleet.task import RolloutTask
from central.supervised import Supervised


def test_a_loop_that_dies_is_logged_counted_and_started_again_until_stopped(caplog):
    starts: list[int] = []

    async def run() -> None:
        starts.append(1)
        if len(starts) == 1:
            raise RuntimeError("a bug")
        await asyncio.Event().wait()  # the loop's normal life: until cancelled

    async def scenario() -> tuple[int, bool, bool]:
        task = Supervised("the test loop", run, max_backoff_s=0.01)
        task.start()
        while len(starts) < 2:
            await asyncio.sleep(0.01)
        restarted, running = task.restarts, task.running
        await task.stop()
        await asyncio.sleep(0.05)  # a restart after stop() would show here
        return restarted, running, task.running

    with caplog.at_level(logging.ERROR):
        restarts, running, after_stop = asyncio.run(scenario())
    assert (restarts, running, after_stop, len(starts)) == (1, True, False, 2)
    assert "the test loop stopped (restart 1): a bug" in caplog.text and "RuntimeError" in caplog.text


def test_the_rollout_task_is_supervised(monkeypatch, caplog):
    """It was the one background loop of central that was not restarted when it died."""
    task = RolloutTask(interval_s=0.01)
    task._task.max_backoff_s = 0.01
    rounds: list[int] = []

    class Bug(BaseException):
        """Not an Exception: the round's except does not catch it, and the loop dies."""

    class DiesOnce:
        def connection(self):
            rounds.append(1)
            if len(rounds) == 1:
                raise Bug("a bug")
            raise OSError("database gone")  # a failed round: counted, the loop goes on

    async def scenario() -> tuple[int, int]:
        task.start(DiesOnce())  # type: ignore[arg-type]
        while task.failed_rounds < 2:
            await asyncio.sleep(0.01)
        await task.stop()
        return task._task.restarts, task.failed_rounds

    with caplog.at_level(logging.WARNING):
        restarts, failed = asyncio.run(scenario())
    assert restarts == 1 and failed >= 2
    assert "the rollout task stopped (restart 1): a bug" in caplog.text
    assert "rollout round failed, the rollout waits: database gone" in caplog.text


def test_stop_returns_even_when_the_loop_swallows_a_cancel():
    """A central test run hung for its whole timeout in the API's shutdown: on Python 3.11 asyncio.wait_for can
    swallow a cancel that lands as the wait ends (the notification worker's idle wait), and stop() awaited a loop
    that went on. stop() now cancels again until the loop ends."""
    swallowed: list[int] = []

    async def run() -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed.append(1)  # what wait_for's race does: the cancel is lost, the loop goes on

    async def scenario() -> bool:
        task = Supervised("the stubborn loop", run)
        task.start()
        await asyncio.sleep(0)
        await asyncio.wait_for(task.stop(), 10)  # the test's own bound: without the fix, stop() never returns
        return task.running

    assert asyncio.run(scenario()) is False and swallowed == [1]
