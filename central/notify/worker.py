"""The delivery worker: an asyncio task of a `pdm-central notify` process (production: central/notify/process.py), or
of each API process's lifespan when PDM_CENTRAL_NOTIFY_WORKER=inline (the default: one process does everything).

Each round (when an ingest has written deliveries, which the worker hears by LISTEN on outbox.CHANNEL whichever
process the ingest ran in: at once after a quiet spell, else `gather_s` after the previous round began, so that
under load one round sends what several ingests wrote; or when something the worker knows of falls due: a retry, a
lease, a digest, the escalation check every `interval_s` when a route escalates; idle otherwise, no polling unless
it cannot listen): escalations that are due, digests that are due, then up to `batch` pending deliveries claimed
(`FOR UPDATE SKIP LOCKED` plus a lease: several gunicorn workers share the outbox without sending a row twice at a
time), sent concurrently, each in a thread, and settled in one statement. A round holds one pool connection, idle
(no transaction) while it sends. A round that fails (the database gone) is logged and counted, and the loop goes
on: the worker never dies of it.
`clock` is the time the outbox and escalations run on (tests pass a fake one and call `run_once`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import time
from collections.abc import Callable
from contextlib import suppress
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from central.notify import channels, outbox
from central.notify.config import NotifyConfig
from web.logs import first_line

log = logging.getLogger("central.notify")
PRUNE_EVERY_S = 3600.0
GATHER_S = 0.2  # at most one wake-up round per this long: see run()
HELD = outbox.HELD_NOTICE.encode()
IDLE_MAX_S = 300.0  # checks and a round at least this often (a clock step, a row written by hand)


def utc_now() -> datetime:
    return datetime.now(UTC)


class Worker:
    def __init__(self, pool: AsyncConnectionPool[Any], config: NotifyConfig,
                 clock: Callable[[], datetime] = utc_now, interval_s: float = 1.0, batch: int = 20,
                 gather_s: float = GATHER_S) -> None:
        self.pool, self.config, self.clock = pool, config, clock
        self.interval_s, self.batch, self.gather_s = interval_s, batch, gather_s
        timeouts = [c.timeout_s for c in config.channels.values()] or [10.0]
        self.lease_s = 2 * max(timeouts) + 5  # past any attempt's end: a row is re-claimed only if its worker died
        self.failed_rounds = 0
        self.delivered = 0
        self.given_up = 0
        self._wake = asyncio.Event()
        self._listening = False
        self._escalating = any(r.escalate_after_min is not None for r in config.routes)
        self._next_checks = 0.0  # time.monotonic() of the next escalation, digest and prune checks
        self._next_prune = 0.0
        self._next_due: float | None = 0.0  # time.monotonic() when a pending delivery falls due (None: none)
        # A thread per delivery of a round, all at once: with the loop's default executor (6 threads on 2 cores) a
        # round to a receiver that never answers took 4 timeouts, past the lease, and another worker sent again.
        self._senders = concurrent.futures.ThreadPoolExecutor(batch, thread_name_prefix="notify-send")

    def status(self) -> dict[str, int]:
        return {"delivered": self.delivered, "given_up": self.given_up, "failed_rounds": self.failed_rounds}

    async def run(self) -> None:
        listener = asyncio.create_task(self._listen(), name="notify-listen")
        try:
            await self._rounds()
        finally:
            listener.cancel()
            with suppress(asyncio.CancelledError):
                await listener

    async def _listen(self) -> None:
        """Wake a round whenever an ingest has committed deliveries (outbox.CHANNEL). On a connection of its own,
        outside the pool, named outbox.LISTENER; while it cannot listen, the worker polls every interval_s, and it
        logs that once, and once when it listens again."""
        down = False
        while True:
            try:
                conninfo, kwargs = self.pool.conninfo, self.pool.kwargs
                if not isinstance(conninfo, str) or not isinstance(kwargs, dict):  # db.make_pool's are
                    raise TypeError("the pool's conninfo and kwargs must be fixed values to listen alike")
                kwargs = {**kwargs, "application_name": outbox.LISTENER, "autocommit": True}
                async with await psycopg.AsyncConnection.connect(conninfo, **kwargs) as conn:
                    await conn.execute(f"LISTEN {outbox.CHANNEL}")
                    if down:
                        log.info("the notification worker listens for new deliveries again")
                        down = False
                    self._listening = True
                    self._next_checks = 0.0  # held rows may have been written while it was not listening
                    self._wake.set()  # what was committed while it was not listening
                    await self._hear(conn)
            except Exception as exc:  # noqa: BLE001 (the database gone: poll meanwhile, try again)
                self._listening = False
                if not down:
                    log.warning("the notification worker cannot listen for new deliveries (it polls every %g s "
                                "meanwhile): %s", self.interval_s, first_line(exc))
                    down = True
            await asyncio.sleep(self.interval_s)

    async def _hear(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Wake a round at each notification on `conn`, until it breaks. Woken by its socket alone: psycopg's
        notifies() wakes the event loop every 0.1 s to look for interrupts, all day long on an idle central."""
        loop, readable, fd = asyncio.get_running_loop(), asyncio.Event(), conn.fileno()
        loop.add_reader(fd, readable.set)
        try:
            while True:
                await readable.wait()
                readable.clear()
                conn.pgconn.consume_input()  # OperationalError once the connection is gone
                while (notice := conn.pgconn.notifies()) is not None:
                    if notice.extra == HELD:  # when their digest is due: the next check says
                        self._next_checks = min(self._next_checks, time.monotonic() + self.interval_s)
                    self._wake.set()
        finally:
            loop.remove_reader(fd)

    async def _rounds(self) -> None:
        while True:
            started = time.monotonic()
            self._wake.clear()  # a wake-up from here on may be for rows this round does not see: another round
            try:
                busy = await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 (the database gone, a bug: logged, counted, the loop goes on)
                self.failed_rounds += 1
                log.warning("notification round failed (%d so far): %s", self.failed_rounds,
                            first_line(exc))
                busy = False
                self._next_due = time.monotonic() + self.interval_s  # not known: poll
            if not busy:
                await self._idle()
                # Wake-ups within gather_s of the last round wait for its end: one round takes the deliveries of
                # every ingest meanwhile (under load, one claim and one mark per window, not per ingest), while a
                # lone alarm after a quiet spell goes out at once.
                await asyncio.sleep(max(0.0, started + self.gather_s - time.monotonic()))

    async def _idle(self) -> None:
        """Until an ingest wakes the worker, or something falls due; one interval while it cannot listen."""
        try:  # not asyncio.wait_for: on 3.11 it can swallow a cancel that lands as the wait ends
            async with asyncio.timeout(self._idle_s()):
                await self._wake.wait()
        except TimeoutError:
            pass

    def _idle_s(self) -> float:
        if not self._listening:
            return self.interval_s
        due = [self._next_checks, self._next_prune] + ([] if self._next_due is None else [self._next_due])
        return min(IDLE_MAX_S, max(0.0, min(due) - time.monotonic()))

    def _schedule(self, at: datetime | None, now: datetime) -> float | None:
        """`at` on the clock -> time.monotonic()."""
        return None if at is None else time.monotonic() + (at - now).total_seconds()

    async def run_once(self, now: datetime | None = None) -> bool:
        """One round; True when it sent a full batch (more may be waiting)."""
        fixed = now
        now = now or self.clock()
        # Escalations and digests are minutes-scale: checked once per interval, not at every ingest's wake-up.
        checks_due = fixed is not None or time.monotonic() >= self._next_checks
        async with self.pool.connection() as conn:
            if checks_due:
                await self._checks(conn, now)
            claimed = await outbox.claim(conn, now, self.lease_s, self.batch)
            if not claimed:
                self._next_due = self._schedule(await outbox.next_due(conn), now)
                return False
            results = await asyncio.gather(*(self._send(channel, payload) for _, channel, payload, _, _ in claimed))
            done = fixed or self.clock()
            outcomes = [(ident, attempts, created_at, error)
                        for (ident, _, _, attempts, created_at), error in zip(claimed, results, strict=True)]
            given_up, due = await outbox.settle(conn, outcomes, done)
        self._next_due = self._schedule(due, done)
        self.delivered += sum(error is None for error in results)
        for (ident, channel, _, attempts, _), error, gone in zip(claimed, results, given_up, strict=True):
            if error is None:
                continue
            if gone:
                self.given_up += 1
                log.error("notification %s to channel %s given up after %d attempts: %s", ident, channel, attempts,
                          error)
            else:
                log.info("notification %s to channel %s failed (attempt %d): %s", ident, channel, attempts, error)
        return len(claimed) == self.batch

    async def _checks(self, conn: psycopg.AsyncConnection[Any], now: datetime) -> None:
        """Escalations, digests and pruning, and when they are next due: every interval while a route escalates,
        else when the next digest is."""
        self._next_checks = time.monotonic() + self.interval_s  # should they fail: again in an interval
        await outbox.escalate(conn, self.config, now)
        _, digest_at = await outbox.flush_digests(conn, self.config, now)
        if time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + PRUNE_EVERY_S
            await outbox.prune(conn, now)
        later = [time.monotonic() + self.interval_s] if self._escalating else []
        digest = self._schedule(digest_at, now)
        later += [] if digest is None else [max(digest, time.monotonic() + self.interval_s)]
        self._next_checks = min(later) if later else time.monotonic() + IDLE_MAX_S

    def close(self) -> None:
        """Let the send threads go once their deliveries end (an attempt cut short is retried: the lease)."""
        self._senders.shutdown(wait=False, cancel_futures=True)

    async def _send(self, name: str, payload: str) -> str | None:
        channel = self.config.channels.get(name)
        if channel is None:
            return f"channel {name!r} is no longer configured"
        document = json.loads(payload)
        try:
            await asyncio.get_running_loop().run_in_executor(self._senders, channels.send, channel,
                                                             document["delivery_id"], document)
        except channels.DeliveryError as exc:
            return str(exc)
        return None
