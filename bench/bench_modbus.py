"""Modbus benchmark: the real ModbusDriver polling 200 TCP devices at 1 Hz, and its top rate against a bare pymodbus
client loop.

Run: python -m bench.bench_modbus [--quick] [--repeats N] [--profile]   (writes the `modbus` section of BENCHMARKS.md)

The devices are pymodbus ModbusTcpServers in a separate process (SERVER below, run with sys.executable), one per
port on 127.0.0.1, unit id 1 each: 200 TCP devices are 200 addresses and 200 connections, as on a plant network,
so the driver opens one connection per device. This process holds only the client side, which is what its CPU and
RSS figures measure. Each device holds 6 contiguous holding registers (int16, int16, float32, uint32: one request
per poll) with values derived from its index, and the first reading of every device is checked against them. The sink offers the driver the same two ways in as the pipeline:
offer() (taken without waiting, on the driver's event loop) and put().

Paced: every device at interval_s = 1 for the window; a reading's `ts` is when its request was sent (the driver
stamps it), so its jitter is `ts` minus the tick of the device's own grid it belongs to (the driver spreads the 200
devices over the second: device i polls at k + i / 200 s, its `phase_s` in the driver's status). Rate (issue 4: "the
agent's Modbus readings/s when polling as fast as it can, as a ratio to a bare pymodbus client loop"): K devices at
an interval_s far below a poll's time (a poll that overran its next tick is followed by the next one at once, the
ticks passed counted as skipped: a device polls back to back, as the bare loop does) against K bare AsyncModbusTcpClients, each awaiting read_holding_registers in a loop,
on the same K ports of the same server process, in the same run. Also at interval_s 0.001, for information: there
the 1 ms grid itself caps K devices at K × 1,000 polls/s (a poll that ends before its next tick waits for it).
The sink only counts (and, paced, keeps ts and received_at): the pipeline behind it is bench_ingest's subject.
Every process it starts is stopped on exit, error included.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import json
import math
import os
import pstats
import resource
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

from bench.report import cpu_seconds, median_spread, write_section
from drivers.modbus import ModbusDriver, ModbusTcpDevice, Register
from drivers.registers import encode

LOCALHOST = "127.0.0.1"
DEVICES = 200
FAST_DEVICES = 20
FAST_INTERVALS_S = (0.0001, 0.001)  # the first one's rate is the ratio's numerator: back to back, grid never binding
TYPE_KEY = "type"
REGISTERS = {  # 6 contiguous registers: one request per poll
    "air_temperature": Register(address=0, type="int16", scale=0.1),
    "process_temperature": Register(address=1, type="int16", scale=0.1),
    "torque": Register(address=2, type="float32"),
    "tool_wear": Register(address=4, type="uint32"),
}
RATIO_GOAL = 0.7

SERVER = """
import asyncio, json, signal, sys
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice
spec = json.loads(sys.stdin.readline())  # {"ports": [...], "words": [[6 words] per port]}
async def main():
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    servers = []
    for port, words in zip(spec["ports"], spec["words"]):
        bits = [SimData(0, values=False, datatype=DataType.BITS)]
        device = SimDevice(1, simdata=(bits, list(bits), [SimData(0, values=words, datatype=DataType.REGISTERS)],
                                       [SimData(65535, datatype=DataType.INVALID)]))
        server = ModbusTcpServer([device], address=("127.0.0.1", port))
        await server.serve_forever(background=True)
        servers.append(server)
    print("ready", flush=True)
    await stop.wait()
    for server in servers:
        await server.shutdown()
asyncio.run(main())
"""


def free_ports(n: int) -> list[int]:
    """n distinct free ports (all bound at once, so the kernel hands out different ones)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for sock in sockets:
            sock.bind((LOCALHOST, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def expected(index: int) -> dict[str, float]:
    return {"air_temperature": round(290 + index / 10, 1), "process_temperature": round(300 + index / 10, 1),
            "torque": 20.5 + index, "tool_wear": 100_000 + index}


def device_words(index: int) -> list[int]:
    words = [0] * 6
    for name, value in expected(index).items():
        register = REGISTERS[name]
        encoded = encode(value, register)
        words[register.address:register.address + len(encoded)] = encoded
    return words


def cpu_s(pid: int | None = None) -> float:
    """User + system CPU seconds of this process (all threads), or of another process by pid."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    return cpu_seconds(pid)


def rss_mb() -> float:
    return next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmRSS")) / 1024


class ServerProcess:
    """SERVER in a subprocess: one ModbusTcpServer per port, device i's words on port i."""

    def __init__(self, n: int) -> None:
        self.ports = free_ports(n)
        self.process = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        self.process.stdin.write(json.dumps({"ports": self.ports, "words": [device_words(i) for i in range(n)]}))
        self.process.stdin.write("\n")
        self.process.stdin.flush()
        if self.process.stdout.readline().strip() != "ready":
            self.stop()
            raise RuntimeError(f"the Modbus server process exited with code {self.process.returncode}")

    def cpu_s(self) -> float:
        return cpu_s(self.process.pid)

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Sink:
    """Counts readings; paced, also keeps (machine_id, ts, received_at) of each and the fields of each device's first
    reading (few objects: the bench adds little to the garbage collector's work). Called from the driver's event loop
    (offer) or its one sink thread (put), never both at once."""

    def __init__(self, keep: bool) -> None:
        self.keep = keep
        self.count = 0
        self.readings: list[tuple[str, float, float]] = []
        self.first: dict[str, dict] = {}

    def offer(self, reading) -> bool:
        """As the pipeline's offer(): taken without waiting (this sink is never full)."""
        self.put(reading)
        return True

    def put(self, reading) -> None:
        self.count += 1
        if self.keep:
            self.readings.append((reading.machine_id, reading.ts, reading.received_at))
            self.first.setdefault(reading.machine_id, reading.fields)


def devices(ports: list[int], interval_s: float) -> list[ModbusTcpDevice]:
    return [ModbusTcpDevice(machine_id=f"dev{i:03d}", machine_type="M", transport="tcp", host=LOCALHOST, port=port,
                            unit_id=1, interval_s=interval_s, timeout_s=1.0, registers=REGISTERS)
            for i, port in enumerate(ports)]


def sleep_until(wall: float) -> None:
    delay = wall - time.time()
    if delay > 0:
        time.sleep(delay)


def paced(server: ServerProcess, seconds: int, stack: ExitStack) -> dict:
    """200 devices at 1 Hz: the window is the ticks T0 .. T0 + seconds - 1; CPU is measured over a span as long,
    half a tick earlier (each device's polls are on its own grid: the span holds one poll of each per second)."""
    gc.collect()
    rss_before = rss_mb()
    sink = Sink(keep=True)
    driver = ModbusDriver(devices(server.ports, 1.0), TYPE_KEY)
    stack.callback(driver.close)
    driver.start(sink)
    gc.collect()
    gc.freeze()  # as `pdm-edge run` does once started (agent/service.py): full collections skip the start-up heap
    stack.callback(gc.unfreeze)
    first_tick = math.ceil(time.time()) + 2  # connections open, a warm-up tick polled
    sleep_until(first_tick - 0.5)
    pauses: list[float] = []  # full (generation 2) collections in the window, s
    started: list[float] = []

    def on_gc(phase: str, info: dict) -> None:
        if info["generation"] == 2:
            if phase == "start":
                started.append(time.perf_counter())
            elif started:
                pauses.append(time.perf_counter() - started.pop())

    gc.callbacks.append(on_gc)
    cpu0, server0, wall0 = cpu_s(), server.cpu_s(), time.monotonic()
    rss = []
    try:
        while time.time() < first_tick + seconds - 0.5:
            rss.append(rss_mb())
            time.sleep(0.1)
        cpu1, server1, wall1 = cpu_s(), server.cpu_s(), time.monotonic()
    finally:
        gc.callbacks.remove(on_gc)
    sleep_until(first_tick + seconds + 0.5)  # answers to the last tick of the window are in
    status = driver.status()
    driver.close()
    gc.unfreeze()

    for i in range(len(server.ports)):
        fields, want = sink.first.get(f"dev{i:03d}"), {**expected(i), TYPE_KEY: "M"}
        if fields is None or any(not math.isclose(fields[k], v, rel_tol=1e-6) if k != TYPE_KEY else fields[k] != v
                                 for k, v in want.items()):
            raise RuntimeError(f"dev{i:03d} read {fields}, expected {want}")
    phase = {machine_id: device["phase_s"] for machine_id, device in status["devices"].items()}
    # (ts on the device's own grid, when it was handed over): a reading belongs to the tick nearest its ts - phase
    window = [(ts - phase[machine_id], received - phase[machine_id]) for machine_id, ts, received in sink.readings
              if first_tick <= round(ts - phase[machine_id]) < first_tick + seconds]
    per_tick = {}
    for ts, _ in window:
        per_tick[round(ts)] = per_tick.get(round(ts), 0) + 1
    jitter = [(ts - round(ts)) * 1000 for ts, _ in window]
    latency = [(received - ts) * 1000 for ts, received in window]
    devices_status = status["devices"].values()
    wall = wall1 - wall0
    return {
        "expected": len(server.ports) * seconds, "received": len(window),
        "min_per_tick": min(per_tick.values(), default=0),
        "skipped": sum(d["skipped_overlaps"] for d in devices_status),
        "failed": sum(d["failed_polls"] for d in devices_status),
        "jitter_p50": percentile(jitter, 0.5), "jitter_p99": percentile(jitter, 0.99), "jitter_max": max(jitter),
        "latency_p50": percentile(latency, 0.5), "latency_p99": percentile(latency, 0.99),
        "cpu": (cpu1 - cpu0) / wall, "server_cpu": (server1 - server0) / wall,
        "rss_before": rss_before, "rss_median": statistics.median(rss), "rss_max": max(rss),
        "rss_growth": max(rss) - rss_before, "gc_full": len(pauses), "gc_full_max_ms": max(pauses, default=0) * 1000,
    }


class LoopProfile:
    """A cProfile of the driver's event-loop thread, switched from inside that thread through the driver's public
    `clock`: the driver calls it on its loop (the "modbus" thread of drivers/modbus.py) when it stamps a reading, and
    cProfile's enable() and disable() act on the thread that calls them."""

    def __init__(self) -> None:
        self.profiler = cProfile.Profile()
        self._want = self._on = False
        self._thread = ""
        self._switched = threading.Event()

    def clock(self) -> float:
        if self._want != self._on:
            (self.profiler.enable if self._want else self.profiler.disable)()
            self._on, self._thread = self._want, threading.current_thread().name
            self._switched.set()
        return time.time()

    def switch(self, on: bool, timeout: float = 10.0) -> None:
        self._switched.clear()
        self._want = on
        if not self._switched.wait(timeout):
            raise RuntimeError(f"the driver did not call its clock within {timeout:g} s: no profile")
        if self._thread != "modbus":
            raise RuntimeError(f"the driver called its clock on thread {self._thread!r}, not its event loop's")

    def report(self, lines: int = 25) -> str:
        out = io.StringIO()
        pstats.Stats(self.profiler, stream=out).sort_stats("tottime").print_stats(lines)
        return out.getvalue()


def driver_rate(server: ServerProcess, k: int, seconds: float, interval_s: float, stack: ExitStack,
                profile: bool = False) -> dict:
    """The driver's readings/s with K devices polling back to back; optionally a cProfile of its loop thread."""
    sink = Sink(keep=False)
    profiler = LoopProfile() if profile else None
    driver = ModbusDriver(devices(server.ports[:k], interval_s), TYPE_KEY,
                          clock=profiler.clock if profiler is not None else time.time)
    stack.callback(driver.close)
    driver.start(sink)
    time.sleep(1.0)  # connected and polling
    if profiler is not None:
        profiler.switch(on=True)
    count0, cpu0, server0, wall0 = sink.count, cpu_s(), server.cpu_s(), time.monotonic()
    time.sleep(seconds)
    count1, cpu1, server1, wall1 = sink.count, cpu_s(), server.cpu_s(), time.monotonic()
    if profiler is not None:
        profiler.switch(on=False)
    status = driver.status()
    driver.close()
    failed = sum(d["failed_polls"] for d in status["devices"].values())
    if failed:
        raise RuntimeError(f"{failed} polls failed during the rate run")
    n, wall = count1 - count0, wall1 - wall0
    result = {"rate": n / wall, "cpu": (cpu1 - cpu0) / wall, "server_cpu": (server1 - server0) / wall,
              "cpu_us": (cpu1 - cpu0) / n * 1e6}
    if profiler is not None:
        result["profile"] = profiler.report()
    return result


LADDER = ("bare read_holding_registers", "+ Link.read_timed (lock, wait for answer / lost / timeout)",
          "+ the device's compiled ResponseDecoder + fields + RawReading",
          "+ offered to the sink at the end of the loop's turn, then a yield (the driver polling back to back)")


def ladder(server: ServerProcess, k: int, seconds: float, repeats: int) -> list[tuple[str, str, str]]:
    """Where the driver's time goes: the bare loop with the driver's steps added one at a time (the driver's own
    functions, one event loop, K connections), the steps interleaved `repeats` times. Returns (step, reads/s, client
    CPU µs per read) per step, as median (min–max)."""
    from pymodbus.client import AsyncModbusTcpClient

    from drivers.base import RawReading
    from drivers.modbus_link import Link
    from drivers.registers import ResponseDecoder, plan_reads

    decoder = ResponseDecoder(plan_reads(REGISTERS)[0], REGISTERS)

    async def run(level: int) -> tuple[float, float]:
        sink = Sink(keep=False)
        ports = server.ports[:k]
        clients = [AsyncModbusTcpClient(LOCALHOST, port=port, timeout=2, retries=0) for port in ports]
        links = [Link.tcp(LOCALHOST, port, 1.0) for port in ports]
        loop = asyncio.get_running_loop()
        stop, count, counting = asyncio.Event(), 0, False

        async def worker(i: int) -> None:
            nonlocal count
            while not stop.is_set():
                if level == 0:
                    words = (await clients[i].read_holding_registers(0, count=6, device_id=1)).registers
                else:
                    words, _ = await links[i].read_timed("holding", 0, 6, 1, 1.0)
                if level >= 2:
                    fields = decoder(words)
                    fields[TYPE_KEY] = "M"
                    reading = RawReading(f"dev{i:03d}", time.time(), fields, "modbus:x", time.time())
                if level >= 3:
                    loop.call_soon(sink.offer, reading)
                    await asyncio.sleep(0)
                if counting:
                    count += 1

        try:
            for client, link in zip(clients, links):
                if level == 0 and not await client.connect():
                    raise RuntimeError("the ladder's bare client could not connect")
                if level > 0:
                    await link.open(1.0)  # a failure shows at the first read
            tasks = [asyncio.create_task(worker(i)) for i in range(len(ports))]
            await asyncio.sleep(1.0)
            counting = True
            count0, cpu0, wall0 = count, cpu_s(), time.monotonic()
            await asyncio.sleep(seconds)
            n, cpu1, wall1 = count - count0, cpu_s(), time.monotonic()
            stop.set()
            await asyncio.gather(*tasks)
            return n / (wall1 - wall0), (cpu1 - cpu0) / n * 1e6
        finally:
            for client, link in zip(clients, links):
                client.close()
                link.close()

    samples: list[list[tuple[float, float]]] = [[] for _ in LADDER]
    for _ in range(repeats):
        for level in range(len(LADDER)):
            samples[level].append(asyncio.run(run(level)))
    return [(step, median_spread([rate for rate, _ in runs]), median_spread([us for _, us in runs], "{:.1f}"))
            for step, runs in zip(LADDER, samples)]


def bare_rate(server: ServerProcess, k: int, seconds: float) -> dict:
    """K bare AsyncModbusTcpClients, each awaiting read_holding_registers of the same 6 registers in a loop."""
    from pymodbus.client import AsyncModbusTcpClient

    async def run() -> dict:
        clients = [AsyncModbusTcpClient(LOCALHOST, port=port, timeout=2, retries=0) for port in server.ports[:k]]
        try:
            for client in clients:
                if not await client.connect():
                    raise RuntimeError(f"the bare client could not connect to port {client.comm_params.port}")
            counting = False
            count = 0
            stop = asyncio.Event()

            async def worker(client) -> None:
                nonlocal count
                while not stop.is_set():
                    response = await client.read_holding_registers(0, count=6, device_id=1)
                    if response.isError() or len(response.registers) != 6:
                        raise RuntimeError(f"bad response {response}")
                    if counting:
                        count += 1

            tasks = [asyncio.create_task(worker(c)) for c in clients]
            await asyncio.sleep(1.0)
            counting = True
            cpu0, server0, wall0 = cpu_s(), server.cpu_s(), time.monotonic()
            count_start = count
            await asyncio.sleep(seconds)
            n = count - count_start
            cpu1, server1, wall1 = cpu_s(), server.cpu_s(), time.monotonic()
            stop.set()
            await asyncio.gather(*tasks)
            wall = wall1 - wall0
            return {"rate": n / wall, "cpu": (cpu1 - cpu0) / wall, "server_cpu": (server1 - server0) / wall,
                    "cpu_us": (cpu1 - cpu0) / n * 1e6}
        finally:
            for client in clients:
                client.close()

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 run, a 5 s paced window, 2 s rate windows")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--profile", action="store_true",
                        help="then print where the driver's time goes: a cost ladder from the bare loop to the "
                             "driver's steps, and a cProfile of the driver's event loop thread during a rate run")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so that the ExitStack below stops what it started
    repeats = args.repeats or (1 if args.quick else 3)
    paced_s, rate_s = (5, 2.0) if args.quick else (20, 5.0)

    runs: dict[str, list[dict]] = {"paced": [], "bare": [], **{f"driver {i}": [] for i in FAST_INTERVALS_S}}
    profile, steps = None, []
    load = [os.getloadavg()[0]]
    with ExitStack() as stack:
        for r in range(repeats):
            server = ServerProcess(DEVICES)
            stack.callback(server.stop)
            runs["paced"].append(paced(server, paced_s, stack))
            runs["bare"].append(bare_rate(server, FAST_DEVICES, rate_s))
            for interval in FAST_INTERVALS_S:
                runs[f"driver {interval}"].append(driver_rate(server, FAST_DEVICES, rate_s, interval, stack))
            server.stop()
            print(f"run {r + 1}/{repeats}: " + json.dumps({k: v[-1] for k, v in runs.items()},
                                                          default=lambda x: round(x, 3)), file=sys.stderr)
        load.append(os.getloadavg()[0])
        if args.profile:
            server = ServerProcess(FAST_DEVICES)
            stack.callback(server.stop)
            steps = ladder(server, FAST_DEVICES, rate_s, repeats)
            profile = driver_rate(server, FAST_DEVICES, rate_s, FAST_INTERVALS_S[0], stack, profile=True)["profile"]
            server.stop()

    for paced_run in runs["paced"]:
        if paced_run["received"] != paced_run["expected"] or paced_run["skipped"] or paced_run["failed"]:
            print(f"MISSING READINGS: {paced_run}", file=sys.stderr)

    def figure(phase: str, key: str, fmt: str = "{:,.0f}") -> str:
        return median_spread([run[key] for run in runs[phase]], fmt)

    fast, grid = (f"driver {i}" for i in FAST_INTERVALS_S)
    ratios = [d["rate"] / b["rate"] for d, b in zip(runs[fast], runs["bare"])]
    grid_ratios = [d["rate"] / b["rate"] for d, b in zip(runs[grid], runs["bare"])]
    grid_s = FAST_INTERVALS_S[1]
    grid_ms, grid_cap = grid_s * 1000, FAST_DEVICES / grid_s
    cpu_ratios = [d["cpu_us"] / b["cpu_us"] for d, b in zip(runs[fast], runs["bare"])]
    n = DEVICES
    rows = [
        (f"paced: readings received in the window / expected ({n} × {paced_s} ticks)",
         f"{figure('paced', 'received')} / {runs['paced'][0]['expected']:,}", "all"),
        ("paced: fewest readings in one tick of the window", figure("paced", "min_per_tick"), f"{n}"),
        ("paced: skipped polls (skipped_overlaps, whole run) / failed polls",
         f"{figure('paced', 'skipped')} / {figure('paced', 'failed')}", "0 / 0"),
        ("paced: request sent − tick (jitter), p50", figure("paced", "jitter_p50", "{:.1f}") + " ms", ""),
        ("paced: request sent − tick (jitter), p99", figure("paced", "jitter_p99", "{:.1f}") + " ms", ""),
        ("paced: request sent − tick (jitter), max", figure("paced", "jitter_max", "{:.1f}") + " ms", ""),
        ("paced: request sent → reading handed to the sink, p50", figure("paced", "latency_p50", "{:.2f}") + " ms", ""),
        ("paced: request sent → reading handed to the sink, p99", figure("paced", "latency_p99", "{:.2f}") + " ms", ""),
        ("paced: CPU of the polling process (share of one core)", figure("paced", "cpu", "{:.1%}"), ""),
        ("paced: CPU of the server process (share of one core)", figure("paced", "server_cpu", "{:.1%}"), ""),
        ("paced: RSS of the polling process before the driver started", figure("paced", "rss_before", "{:.1f}") + " MB",
         ""),
        ("paced: RSS of the polling process while polling, median", figure("paced", "rss_median", "{:.1f}") + " MB", ""),
        ("paced: RSS of the polling process while polling, max", figure("paced", "rss_max", "{:.1f}") + " MB", ""),
        ("paced: RSS max − RSS before the driver started", figure("paced", "rss_growth", "{:.1f}") + " MB", ""),
        ("paced: full (gen 2) garbage collections in the window; longest",
         f"{figure('paced', 'gc_full')}; {figure('paced', 'gc_full_max_ms', '{:.1f}')} ms", ""),
        (f"rate: bare AsyncModbusTcpClient loop, {FAST_DEVICES} connections", figure("bare", "rate") + " reads/s", ""),
        (f"rate: ModbusDriver, {FAST_DEVICES} devices polling back to back (interval_s = {FAST_INTERVALS_S[0]:g})",
         figure(fast, "rate") + " readings/s", ""),
        ("rate: driver / bare", median_spread(ratios, "{:.2f}"), f"≥ {RATIO_GOAL}"),
        (f"rate: ModbusDriver on a {grid_ms:g} ms grid (interval_s {grid_s:g}: ≤ {grid_cap:,.0f}/s); / bare",
         f"{figure(grid, 'rate')} readings/s; {median_spread(grid_ratios, '{:.2f}')}", ""),
        ("rate: client-process CPU per read, bare", figure("bare", "cpu_us", "{:.0f}") + " µs", ""),
        (f"rate: client-process CPU per reading, driver (interval_s = {FAST_INTERVALS_S[0]:g})",
         figure(fast, "cpu_us", "{:.0f}") + " µs", ""),
        ("rate: CPU per reading, driver / bare", median_spread(cpu_ratios, "{:.2f}"), ""),
        ("rate: CPU of the client process (share of one core), bare / driver",
         f"{figure('bare', 'cpu', '{:.0%}')} / {figure(fast, 'cpu', '{:.0%}')}", ""),
        ("rate: CPU of the server process (share of one core), bare / driver",
         f"{figure('bare', 'server_cpu', '{:.0%}')} / {figure(fast, 'server_cpu', '{:.0%}')}", ""),
    ]
    body = "| figure | median (min–max) | goal |\n|---|---|---|\n"
    body += "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    body += (
        f"\n\n{repeats} runs{' (--quick)' if args.quick else ''}, each with a fresh server process. Devices: "
        f"{n} pymodbus 3 ModbusTcpServers in one separate process on 127.0.0.1, one port each (unit id 1), so "
        f"{n} devices are {n} TCP connections, as {n} devices on a plant network would be; each holds 6 contiguous "
        f"holding registers (int16 ×2 with scale 0.1, float32, uint32: one request per poll), checked against the "
        f"values the first reading of every device decodes to. The measured process holds only the client side; "
        f"client and server share the machine's cores. Paced: the real ModbusDriver (timeout_s 1, retries 2), "
        f"interval_s = 1, a {paced_s} s window after a warm-up tick, the start-up heap frozen out of garbage collection as "
        f"`pdm-edge run` freezes its own (gc.freeze()); jitter is the reading's `ts` (when its request "
        f"was sent, stamped by the driver) minus its tick on the device's own grid (device i of {n} polls at "
        f"k + i / {n} s); CPU is getrusage of the whole process (all threads) "
        f"over the window; RSS is VmRSS every 100 ms. Rate: over {rate_s:g} s after 1 s of warm-up; the driver "
        f"decodes, builds a RawReading and offers it to a sink that only counts, on its "
        f"event loop, as it offers the pipeline (its sink thread takes only what a full sink refuses); the bare loop awaits read_holding_registers and checks the register count. Both use one "
        f"connection per device and one request in flight per connection. Load average (1 min) at start / end: "
        f"{load[0]:.2f} / {load[-1]:.2f} on {os.cpu_count()} cores: rates are wall-clock figures and move with "
        f"whatever else runs; CPU per reading moves less.")
    command = "python -m bench.bench_modbus" + (" --quick" if args.quick else "")
    write_section("modbus", command, body, ("pymodbus", "pydantic"))
    print(body)
    if steps:
        print("\nWhere the driver's time goes (bare loop + the driver's steps, one at a time):")
        for step, rate, us in steps:
            print(f"  {step:80s} {rate} reads/s, {us} µs client CPU per read")
    if profile:
        print("\ncProfile of the driver's event loop thread during a rate run:\n" + profile)


if __name__ == "__main__":
    main()
