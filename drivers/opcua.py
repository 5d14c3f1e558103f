"""OPC UA servers (`[[opcua]]`, drivers/opcua_config.py): one subscription per server, readings on change.

How the driver runs (who calls what, from which thread):
- The agent calls `start(sink)`, `stop()`, `close()` and `stats()` from its own thread.
- `start` runs one asyncio event loop in one thread ("opcua") with one supervised task per server. A task that
  dies of a bug is logged with its traceback, counted (`task_restarts`), shown as down and started again after
  the backoff; a dead or slow server never delays another.
- Each server's task connects (a fresh asyncua Client each time, with its security settings applied again and the
  server certificate checked against the trusted folder again: a rotated certificate is seen at once), resolves
  browse paths, creates one subscription (publishing interval `publishing_ms`, each node sampled every
  `sampling_ms` with a queue of `queue_size` and its optional absolute deadband) and consumes its data changes.
- Any failure (refused connection, server restart, network cut, session timeout or BadSessionIdInvalid, a
  certificate that is no longer trusted, a watchdog read that goes unanswered within `timeout_s`) ends the
  connection; the task reconnects after a backoff with jitter (half a second doubling up to `backoff_max_s`),
  forever. It is logged once when the server goes down and once when it is back, and counted in between.

Readings: on change. The changes of one publish (and any queued behind it) are applied together; each machine
with a changed input gives one reading with its latest value of every input (drivers/opcua_values.py: none
before every input has a value, an input changing twice gives two readings, a reconnect alone gives none). Why
on change rather than on a schedule: the server already samples at `sampling_ms` and drops changes inside the
deadband, so readings follow the machine at the rate it changes; a schedule would score the same values again.
The readings go to the sink from one "opcua-sink" thread; while the sink blocks (back-pressure), notifications
wait in the subscription's queue (up to QUEUE_MAX); a queue that overflows ends the connection (counted as
`overflows`), and the reconnect starts again from the servers' current values.

A node the server does not have (or a browse path that leads nowhere): a per-node error, counted
(`node_errors`), logged once until it works, shown in status; that machine makes no readings (an input would be
missing), the other machines of the server go on. It is looked up again at every reconnect.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from drivers.base import Availability, DeviceStats, DriverStats, RawReading, Sink
from drivers.loop_thread import LoopThread
from drivers.opcua_config import OpcuaMachine, OpcuaNode, OpcuaServer, browse_path_parts
from drivers.opcua_values import MachineReadings, Unusable, convert
from model.validate import Reason, Rejection

log = logging.getLogger(__name__)

QUEUE_MAX = 50_000  # notifications waiting for the sink, per server: 5 s of 10,000 items at 1 Hz, about 50 MB
OVERFLOW = "overflow"  # what `lost` holds when the subscription's queue overflowed
CLIENT_HANDLE_BASE = 1000
# Monitored items created per CreateMonitoredItems call: servers cap it (OperationLimits/MaxMonitoredItemsPerCall,
# often 1,000 on PLCs), and a call for 10,000 items decodes and keeps 10,000 requests and results at once.
ITEMS_PER_CALL = 1000


class OpcuaSetupError(ValueError):
    """The driver cannot run on this machine (the `opcua` extra is not installed)."""


class ConnectionEnded(Exception):
    """The connection to a server failed or was lost; the message says why in one line."""


def quiet_library() -> None:
    # asyncua logs every failed connect, every lost publish and its own reconnect attempts at WARNING/ERROR, with
    # tracebacks. We log state changes and count the rest. An operator who set its level keeps it.
    library = logging.getLogger("asyncua")
    if library.level == logging.NOTSET:
        library.setLevel(logging.CRITICAL)


def backoff_s(failed_in_a_row: int, cap_s: float, jitter: float) -> float:
    """Half a second after the first failure, doubling, at most `cap_s`; `jitter` in [0, 1) spreads it over
    [delay / 2, delay) so servers that failed together are not retried in the same instant."""
    delay = min(cap_s, 0.5 * 2.0 ** min(failed_in_a_row - 1, 30))
    return delay * (0.5 + jitter / 2)


@dataclass(slots=True)
class _Item:
    machine: OpcuaMachine
    input: str
    node: OpcuaNode
    readings: MachineReadings


class _Server:
    """One server's state and counters. Lives on the driver's event loop."""

    def __init__(self, config: OpcuaServer) -> None:
        self.config = config
        self.availability = Availability(f"OPC UA server {config.label}", log)
        self.task: asyncio.Task[None] | None = None
        self.connected = False
        self.failed_in_a_row = 0
        self.retry_at: float | None = None
        self.connects = self.connect_failures = self.connection_losses = self.task_restarts = 0
        self.notifications = self.readings = self.overflows = 0
        self.node_errors: dict[str, str] = {}  # "machine.input" -> what is wrong
        self.node_error_count = 0
        self.logged: set[tuple[str, str]] = set()  # (key, error) logged, until it works
        self.machines: dict[str, MachineReadings] = {}
        self.last_reading_ts: float | None = None

    def status(self, now: float) -> dict[str, Any]:
        config = self.config
        node_error = next(iter(self.node_errors.values()), None)
        return {
            "url": config.url, "security": f"{config.security_policy}"
            + ("" if config.security_policy == "None" else f" {config.security_mode}"),
            "available": self.availability.up and self.connected, "connected": self.connected,
            "machines": sorted(m.machine_id for m in config.machines), "monitored_items":
                sum(len(m.nodes) for m in config.machines) - len(self.node_errors) if self.connected else 0,
            "connects": self.connects, "connect_failures": self.connect_failures,
            "connection_losses": self.connection_losses, "task_restarts": self.task_restarts,
            "notifications": self.notifications, "readings": self.readings, "overflows": self.overflows,
            "duplicates_skipped": sum(m.duplicates for m in self.machines.values()),
            "node_errors": self.node_error_count, "failing_nodes": dict(self.node_errors),
            "retry_in_s": None if self.retry_at is None else round(max(0.0, self.retry_at - now), 3),
            "last_reading_ts": self.last_reading_ts,
            "last_error": self.availability.last_error if not self.availability.up else node_error,
        }

    def stats(self) -> DeviceStats:
        node_error = next(iter(self.node_errors.values()), None)
        return DeviceStats(
            device=self.config.label, connected=self.availability.up and self.connected,
            errors={"connect_failures": self.connect_failures, "connection_losses": self.connection_losses},
            last_error=self.availability.last_error if not self.availability.up else node_error)


class OpcuaDriver:
    """Subscribes to OPC UA servers; see the module docstring for threads, readings and failure handling."""

    name = "opcua"
    queue_max = QUEUE_MAX

    def __init__(self, servers: Sequence[OpcuaServer], type_key: str, clock: Callable[[], float] = time.time) -> None:
        try:
            import asyncua  # noqa: F401
        except ImportError:
            raise OpcuaSetupError("[[opcua]] needs the opcua extra: pip install 'pdm-edge[opcua]'") from None
        self.servers = list(servers)
        self._type_key = type_key
        self._clock = clock
        self._sink: Sink | None = None
        self._stopped = True
        self._threads = LoopThread("opcua")
        self._states: list[_Server] = []

    # --- called by the agent ---
    def start(self, sink: Sink) -> None:
        if self._threads.started:
            raise RuntimeError("the OPC UA driver is already started")
        quiet_library()
        self._sink, self._stopped = sink, False
        self._states = [_Server(server) for server in self.servers]
        self._threads.start()
        self._threads.run(self._begin())
        log.info("subscribing to %d OPC UA server(s) for %d machine(s)", len(self._states),
                 sum(len(s.machines) for s in self.servers))

    def stop(self) -> None:
        """Hand nothing more to the sink; subscriptions end and connections close in close()."""
        self._stopped = True
        self._threads.drain_sink()

    def close(self) -> None:
        self.stop()
        self._threads.close(self._cancel)

    def status(self) -> dict[str, Any]:
        """Everything the driver counts, for people and tests: `stats()` is what the agent reads."""
        now = self._threads.time()
        states = list(self._states)
        return {"driver": self.name, "devices": {s.config.label: s.status(now) for s in states},
                "available": sum(s.availability.up and s.connected for s in states), "total": len(states)}

    def stats(self) -> DriverStats:
        return DriverStats.of_devices(self.name, tuple(s.stats() for s in list(self._states)), self.status())

    # --- on the event loop ---
    async def _begin(self) -> None:
        for state in self._states:
            state.task = asyncio.create_task(self._supervise(state), name=f"opcua {state.config.label}")

    async def _cancel(self) -> None:
        tasks = [s.task for s in self._states if s.task is not None and not s.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _supervise(self, state: _Server) -> None:
        """Run the server's connection loop; restart it when it dies of a bug."""
        while True:
            try:
                await self._connect_forever(state)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug: say it with its traceback, show the server down, start again
                log.exception("OPC UA server %s: its task failed; restarting it", state.config.label)
                state.task_restarts += 1
                state.connected = False
                state.machines.clear()  # what it had not handed on comes again with the servers' current values
                await self._wait_to_retry(state, f"internal error: {exc!r}")

    async def _connect_forever(self, state: _Server) -> None:
        while True:
            try:
                await self._session(state)
                error = "the connection ended"
            except ConnectionEnded as exc:
                error = str(exc)
            finally:
                state.connected = False
            await self._wait_to_retry(state, error)

    async def _wait_to_retry(self, state: _Server, error: str) -> None:
        state.failed_in_a_row += 1
        state.availability.failed(error)
        delay = backoff_s(state.failed_in_a_row, state.config.backoff_max_s, random.random())
        loop = asyncio.get_running_loop()
        state.retry_at = loop.time() + delay
        await asyncio.sleep(delay)
        state.retry_at = None

    async def _session(self, state: _Server) -> None:
        """One connection: connect, subscribe, consume until it fails. Raises ConnectionEnded."""
        from drivers.opcua_session import connect, describe_failure

        config = state.config
        lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        client = None
        try:
            try:
                client = await connect(config, lost)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure to connect is described and retried
                state.connect_failures += 1
                raise ConnectionEnded(describe_failure(exc, config)) from None
            state.connects += 1
            try:
                subscription, items = await self._subscribe(state, client, lost)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - as for the connection
                state.connect_failures += 1
                raise ConnectionEnded(f"cannot subscribe: {describe_failure(exc, config)}") from None
            state.connected = True
            state.failed_in_a_row = 0
            state.availability.succeeded()
            await self._consume(state, subscription, items, lost)
        finally:
            if client is not None:
                from drivers.opcua_session import disconnect

                await disconnect(client, config.timeout_s)

    async def _subscribe(self, state: _Server, client: Any, lost: asyncio.Future[str]) -> tuple[Any, dict[int, _Item]]:
        from asyncua import ua

        from drivers.opcua_session import OverflowPolicy

        config = state.config
        params = ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=config.publishing_interval_ms,
            RequestedLifetimeCount=10_000,
            RequestedMaxKeepAliveCount=client.get_keepalive_count(config.publishing_interval_ms),
            MaxNotificationsPerPublish=0,  # no limit
            PublishingEnabled=True, Priority=0)
        subscription = await client.create_subscription(params, None, queue_maxsize=self.queue_max,
                                                        overflow=OverflowPolicy.DISCONNECT)

        def overflowed() -> None:  # on the loop, while the consumer may wait for a blocked sink: count it now
            if not lost.done():
                lost.set_result(OVERFLOW)
                state.overflows += 1
            client.uaclient.notify_transport_lost()

        subscription.set_overflow_disconnect_handler(overflowed)
        trimmed = _release_when_queued(client, subscription, ua)
        items: dict[int, _Item] = {}
        wanted: list[tuple[int, Any]] = []  # (client handle, NodeId)
        handle = CLIENT_HANDLE_BASE
        errors: dict[str, str] = {}
        for machine in config.machines:
            readings = state.machines.get(machine.machine_id)
            if readings is None:
                readings = MachineReadings(tuple(machine.nodes), self._emitter(state, machine))
                state.machines[machine.machine_id] = readings
            for name, node in machine.nodes.items():
                key = f"{machine.machine_id}.{name}"
                try:
                    node_id = await self._node_id(client, node.node)
                except _NodeMissing as exc:
                    errors[key] = f"{node.node}: {exc}"
                    continue
                handle += 1
                items[handle] = _Item(machine, name, node, readings)
                wanted.append((handle, node_id))
        for start in range(0, len(wanted), ITEMS_PER_CALL):
            chunk = wanted[start:start + ITEMS_PER_CALL]
            results = await subscription.create_monitored_items(
                [_request(ua, node_id, handle, config, items[handle].node) for handle, node_id in chunk])
            for (handle, _), result in zip(chunk, results):
                if isinstance(result, ua.StatusCode):
                    item = items.pop(handle)
                    errors[f"{item.machine.machine_id}.{item.input}"] = f"{item.node.node}: {result.name}"
        shared = _share_one_node(client, subscription)
        if not (trimmed and shared):
            log.warning("OPC UA %s: this asyncua's internals differ from 2.1's: its memory trims are off (the "
                        "subscription works as before, with about 5 MB more per 10,000 items)", state.config.label)
        self._node_errors(state, errors)
        return subscription, items

    async def _node_id(self, client: Any, node: str) -> Any:
        from asyncua import ua
        from asyncua.ua.uaerrors import UaStatusCodeError

        if not node.startswith("/"):
            return ua.NodeId.from_string(node)
        try:
            found = await client.nodes.root.get_child(browse_path_parts(node))
        except UaStatusCodeError as exc:
            raise _NodeMissing(f"no such browse path ({type(exc).__name__})") from None
        return found.nodeid

    def _node_errors(self, state: _Server, errors: dict[str, str]) -> None:
        """Count and log (once until it works) the nodes that could not be monitored at this connection."""
        state.node_error_count += len(errors)
        for key, error in errors.items():
            if (key, error) not in state.logged:
                state.logged.add((key, error))
                machine, _, name = key.partition(".")
                log.warning("OPC UA server %s: machine %s input %s cannot be monitored: %s. Its machine makes no "
                            "readings until it can; `pdm-edge opcua browse --url %s` lists the nodes. Counted "
                            "from now on; logged again only after it works", state.config.label, machine, name,
                            error, state.config.url, extra={"connection": state.availability.name})
        state.logged = {entry for entry in state.logged if entry[0] in errors}
        state.node_errors = errors

    async def _consume(self, state: _Server, subscription: Any, items: dict[int, _Item],
                       lost: asyncio.Future[str]) -> None:
        from asyncua.common.subscription import DataChangeEvent, StatusChangeEvent

        queue: asyncio.Queue[Any] = subscription._event_queue  # drained whole after each wake-up: one publish at a time
        while True:
            if queue.empty() and not lost.done():
                getter = asyncio.ensure_future(queue.get())
                try:
                    await asyncio.wait({getter, lost}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    got = getter.done()
                    if not got:  # a queue.get() cancelled before it took an item takes none
                        getter.cancel()
                batch = [getter.result()] if got else []
            else:
                batch = []
            while not queue.empty():
                batch.append(queue.get_nowait())
            if not batch and lost.done():
                break
            touched: dict[int, MachineReadings] = {}
            ended = None
            pending: list[RawReading] = []
            self._collecting = pending  # what the machines emit while this batch is applied and flushed
            for event in batch:
                if isinstance(event, DataChangeEvent):
                    item = items.get(event.data.monitored_item.ClientHandle)
                    if item is not None:
                        state.notifications += 1
                        self._apply(item, event.data.monitored_item.Value)
                        touched[id(item.readings)] = item.readings
                elif isinstance(event, StatusChangeEvent) or event is None:
                    ended = "the server ended the subscription" if event is not None else "subscription closed"
            for readings in touched.values():
                readings.flush()
            self._collecting = None
            batch.clear()  # a publish's notifications (10,000 objects at 10,000 items) are not kept while waiting
            await self._hand_on(state, pending)
            pending.clear()
            if ended and not lost.done():
                state.connection_losses += 1
                raise ConnectionEnded(ended)
        state.connection_losses += 1
        if lost.result() == OVERFLOW:
            raise ConnectionEnded(f"more than {self.queue_max} changes waited for the pipeline: reconnecting")
        raise ConnectionEnded(f"connection lost: {lost.result()}")

    async def _hand_on(self, state: _Server, pending: list[RawReading]) -> None:
        if pending:
            loop = asyncio.get_running_loop()
            handed = await loop.run_in_executor(self._threads.sink, self._hand, pending)
            state.readings += handed
            if handed:
                state.last_reading_ts = pending[handed - 1].ts

    _collecting: list[RawReading] | None = None

    def _apply(self, item: _Item, data_value: Any) -> None:
        status = data_value.StatusCode
        raw = data_value.Value.Value if data_value.Value is not None else None
        bad = status.name if status is not None and status.is_bad() else None
        value = convert(raw, item.node.scale, item.node.offset, bad)
        stamp = data_value.SourceTimestamp or data_value.ServerTimestamp
        item.readings.update(item.input, raw if bad is None else bad, value,
                             stamp.timestamp() if stamp is not None else None)

    def _emitter(self, state: _Server,
                 machine: OpcuaMachine) -> Callable[[dict[str, float | Unusable], float | None], None]:
        names = tuple(machine.nodes)
        source = f"opcua:{state.config.label}"

        def emit(values: dict[str, float | Unusable], source_ts: float | None) -> None:
            received = self._clock()
            fields: dict[str, Any] = {}
            rejection = None
            for name in names:
                value = values[name]
                if isinstance(value, Unusable):
                    fields[name] = None
                    if rejection is None:
                        rejection = Rejection(Reason.NOT_A_NUMBER, f"{name} ({machine.nodes[name].node}): "
                                              f"{value.why}", name)
                else:
                    fields[name] = value
            fields[self._type_key] = machine.machine_type
            # The payload is for the quarantine: "" when every value is a number (the pipeline then keeps the fields
            # as JSON, the same text), so a valid reading carries no JSON of its own.
            payload = "" if rejection is None else json.dumps(
                {name: _shown(values.get(name), field) for name, field in fields.items()})
            reading = RawReading(machine.machine_id, source_ts if source_ts is not None else received, fields,
                                 source, received, payload, rejection)
            if self._collecting is not None:
                self._collecting.append(reading)

        return emit

    # --- on the sink thread ---
    def _hand(self, readings: list[RawReading]) -> int:
        handed = 0
        for reading in readings:
            if self._stopped or self._sink is None:
                break
            self._sink.put(reading)
            handed += 1
        return handed


def _shown(value: float | Unusable | None, field: Any) -> Any:
    """What the quarantine shows of an input: why its value is unusable, or the field."""
    return value.why if isinstance(value, Unusable) else field


class _NodeMissing(Exception):
    pass


def _release_when_queued(client: Any, subscription: Any, ua: Any) -> bool:
    """asyncua's publish loop holds each publish response until the next one arrives, so at 10,000 items two
    publishes' notifications (about 5 MB each) are alive at once. Once the subscription has queued a publish's
    notifications as events, the response's own lists of them are emptied; the list of notification messages is
    kept, since the loop acknowledges a publish only when it is not empty. asyncua 2.1's internals: False, and
    nothing changed, where they are not there."""
    callbacks = getattr(client.uaclient, "_subscription_callbacks", None)
    if not isinstance(callbacks, dict) or (queue_events := callbacks.get(subscription.subscription_id)) is None:
        return False

    async def queue_then_release(result: Any) -> None:
        await queue_events(result)
        for data in result.NotificationMessage.NotificationData or ():
            if isinstance(data, ua.DataChangeNotification):
                data.MonitoredItems = []
                data.DiagnosticInfos = []

    callbacks[subscription.subscription_id] = queue_then_release
    return True


def _share_one_node(client: Any, subscription: Any) -> bool:
    """asyncua keeps a Node (and its NodeId) for each monitored item, only to create the items again after its own
    reconnection, which is off (the driver reconnects with a fresh client and subscription); the events carry it, the
    driver reads none. One shared Node frees about 3 MB at 10,000 items. False where asyncua keeps them otherwise."""
    items = getattr(subscription, "_monitored_items", None)
    if not isinstance(items, dict) or not all(hasattr(data, "node") for data in items.values()):
        return False
    shared = client.nodes.root
    for data in items.values():
        data.node = shared
    return True


def _request(ua: Any, node_id: Any, handle: int, config: OpcuaServer, node: OpcuaNode) -> Any:
    parameters = ua.MonitoringParameters(ClientHandle=handle, SamplingInterval=float(config.sampling_ms),
                                         QueueSize=config.queue_size, DiscardOldest=True)
    if node.deadband is not None:
        parameters.Filter = ua.DataChangeFilter(Trigger=ua.DataChangeTrigger.StatusValue,
                                                DeadbandType=ua.DeadbandType.Absolute, DeadbandValue=node.deadband)
    return ua.MonitoredItemCreateRequest(
        ItemToMonitor=ua.ReadValueId(NodeId=node_id, AttributeId=ua.AttributeIds.Value),
        MonitoringMode=ua.MonitoringMode.Reporting, RequestedParameters=parameters)
