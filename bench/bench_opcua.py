"""OPC UA benchmark: the agent (`pdm-edge run` with an `[[opcua]]` server) storing readings into SQLite against a
bare asyncua client counting data-change notifications, on the same server in the same run; and 10,000 monitored
items on one server at 1 Hz.

Run: python -m bench.bench_opcua [--quick] [--repeats N]   (writes the `opcua` section of BENCHMARKS.md)

The server is an asyncua Server in a separate process (SERVER below), with the plant simulator's address space
(drivers/simulator_opcua.py): M machines, 5 Double variables each. Every round it writes new values to every
variable of every machine with one source timestamp per round: flat out (`period 0`) for the rate, every second for
the scale run.

Rate: the bare client (one asyncua Client, one subscription, publishing and sampling every 50 ms, queue 10 per item,
iterator mode) counts notifications over the window; then the agent, same server, same settings, a fresh data
folder, counts readings committed to its SQLite file over the window (polled read-only). A reading carries one
round of a machine's 5 variables, so the ratio compares agent readings × 5 with bare notifications. Scale: 2,000
machines × 5 = 10,000 monitored items sampled at 1 s: readings committed per second against the 2,000 a second the
server produces, the age of the newest committed reading (now − its source timestamp), the agent's RSS (VmRSS every
500 ms) and CPU. Every process it starts is stopped on exit, error included.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from bench.report import cpu_seconds, median_spread, write_section
from drivers.simulator import INPUTS
from testkit.net import free_port

RATE_MACHINES = 20
SCALE_MACHINES = 2_000
RATIO_GOAL = 0.7
RSS_GOAL_MB = 150
PUBLISH_MS = 50

SERVER = """
import asyncio, json, signal, sys
from datetime import UTC, datetime
from asyncua import ua
from drivers.simulator_opcua import build_server
from drivers.opcua import quiet_library
spec = json.loads(sys.stdin.readline())  # {"port", "machines", "period_s", "rounds_file"}
machines = {f"m{i + 1}": "LMH"[i % 3] for i in range(spec["machines"])}
names = ("air_temperature", "process_temperature", "rotational_speed", "torque", "tool_wear")
base = {"air_temperature": 300.0, "process_temperature": 310.0, "rotational_speed": 1500.0, "torque": 40.0,
        "tool_wear": 0.0}
async def main():
    quiet_library()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    server, nodes = await build_server("127.0.0.1", spec["port"], machines, {m: base for m in machines})
    await server.start()
    print("ready", flush=True)
    items = [(nodes[(m, n)].nodeid, base[n]) for m in machines for n in names]
    step = 0
    while not stop.is_set():
        step += 1
        if step % 5 == 0 or spec["period_s"] >= 0.5:
            with open(spec["rounds_file"], "w") as out:
                out.write(str(step))
        stamp = datetime.now(UTC)
        for nodeid, value in items:
            dv = ua.DataValue(ua.Variant(value + (step % 200) * 0.1, ua.VariantType.Double), SourceTimestamp=stamp,
                              ServerTimestamp=stamp)
            await server.write_attribute_value(nodeid, dv)
        await asyncio.sleep(spec["period_s"])
    await server.stop()
asyncio.run(main())
"""


class ServerProcess:
    def __init__(self, machines: int, period_s: float) -> None:
        self.port = free_port()
        self.rounds_file = Path(tempfile.mkstemp(prefix="bench-opcua-rounds-")[1])
        self.process = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, cwd=Path(__file__).resolve().parents[1])
        self.process.stdin.write(json.dumps({"port": self.port, "machines": machines, "period_s": period_s,
                                             "rounds_file": str(self.rounds_file)}) + "\n")
        self.process.stdin.flush()
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError("the OPC UA server process did not start")
        self.machines = machines

    def rounds(self) -> int:
        """Rounds written so far (every variable of every machine once per round)."""
        text = self.rounds_file.read_text().strip()
        return int(text) if text else 0

    def stop(self) -> None:
        stop_process(self.process)
        self.rounds_file.unlink(missing_ok=True)


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def rss_mb(pid: int) -> float:
    return next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith("VmRSS")) / 1024


def bare_rate(server: ServerProcess, window_s: float, mark=lambda: None) -> dict:
    """Notifications per second a bare asyncua client receives from the server's machines; the server's rounds.
    `mark()` is called when the window starts and when it ends."""
    from asyncua import ua
    from asyncua.client.client import Client
    from asyncua.ua.attribute_ids import AttributeIds

    async def run() -> dict:
        client = Client(f"opc.tcp://127.0.0.1:{server.port}", timeout=10)
        await client.connect()
        try:
            subscription = await client.create_subscription(PUBLISH_MS, None, queue_maxsize=1_000_000)
            requests = []
            for handle, (machine, name) in enumerate(
                    ((f"m{i + 1}", n) for i in range(server.machines) for n in INPUTS), start=1):
                requests.append(ua.MonitoredItemCreateRequest(
                    ItemToMonitor=ua.ReadValueId(NodeId=ua.NodeId.from_string(f"ns=2;s={machine}.{name}"),
                                                 AttributeId=AttributeIds.Value),
                    MonitoringMode=ua.MonitoringMode.Reporting, RequestedParameters=ua.MonitoringParameters(
                        ClientHandle=handle, SamplingInterval=PUBLISH_MS, QueueSize=10, DiscardOldest=True)))
            await subscription.create_monitored_items(requests)
            count = 0
            warm_until = time.monotonic() + 1.0
            while time.monotonic() < warm_until:
                await subscription.next_event(timeout=0.2)
            mark()
            start, end, rounds0 = time.monotonic(), time.monotonic() + window_s, server.rounds()
            while time.monotonic() < end:
                if await subscription.next_event(timeout=0.2) is not None:
                    count += 1
            elapsed = time.monotonic() - start
            mark()
            produced = (server.rounds() - rounds0) * server.machines * len(INPUTS)
            return {"rate": count / elapsed, "share": count / produced, "produced": produced / elapsed}
        finally:
            await client.disconnect()

    return asyncio.run(run())


class Agent:
    """`pdm-edge run` on a fresh data folder with one [[opcua]] server."""

    def __init__(self, server: ServerProcess, workdir: Path, sampling_ms: int) -> None:
        workdir.mkdir(parents=True)
        self.db = workdir / "data" / "agent.db"
        self.log = workdir / "agent.log"
        lines = ['gateway_id = "bench"', f'data_dir = "{workdir / "data"}"', 'log_format = "json"',
                 "[status]", f'bind = "127.0.0.1:{free_port()}"', "[buffer]", "max_db_mb = 4096",
                 "[[opcua]]", f'url = "opc.tcp://127.0.0.1:{server.port}"', f"sampling_ms = {sampling_ms}",
                 "timeout_s = 30"]
        for i in range(server.machines):
            lines += ["[[opcua.machines]]", f'machine_id = "m{i + 1}"', f'machine_type = "{"LMH"[i % 3]}"',
                      "[opcua.machines.nodes]", *(f'{n} = "ns=2;s=m{i + 1}.{n}"' for n in INPUTS)]
        config = workdir / "agent.toml"
        config.write_text("\n".join(lines) + "\n")
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("PDM_") and k not in ("CREDENTIALS_DIRECTORY", "STATE_DIRECTORY")}
        with self.log.open("w") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
                                            cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)

    def rows(self) -> tuple[int, float | None]:
        """(readings committed, newest source timestamp)."""
        try:
            with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True) as db:
                return db.execute("SELECT count(*), max(ts) FROM readings").fetchone()
        except sqlite3.OperationalError:
            return 0, None

    def wait_readings(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.rows()[0] < n:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the agent stored {self.rows()[0]} of {n}:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        stop_process(self.process)


def agent_run(server: ServerProcess, workdir: Path, window_s: float, sampling_ms: int, stack: ExitStack) -> dict:
    agent = Agent(server, workdir, sampling_ms)
    stack.callback(agent.stop)
    agent.wait_readings(server.machines * 2)
    time.sleep(1.0)
    rss, lags = [], []
    n0, _ = agent.rows()
    rounds0 = server.rounds()
    cpu0, t0 = cpu_seconds(agent.process.pid), time.monotonic()
    while time.monotonic() - t0 < window_s:
        time.sleep(0.5)
        rss.append(rss_mb(agent.process.pid))
        _, newest = agent.rows()
        if newest is not None:
            lags.append(time.time() - newest)
    n1, _ = agent.rows()
    elapsed = time.monotonic() - t0
    produced = (server.rounds() - rounds0) * server.machines
    result = {"rate": (n1 - n0) / elapsed, "share": (n1 - n0) / produced, "produced": produced / elapsed,
              "writes": produced * len(INPUTS) / elapsed, "cpu": (cpu_seconds(agent.process.pid) - cpu0) / elapsed,
              "rss_median": sorted(rss)[len(rss) // 2], "rss_max": max(rss), "lag_max": max(lags),
              "lag_median": sorted(lags)[len(lags) // 2]}
    agent.stop()
    return result


def rate_run(server: ServerProcess, workdir: Path, window_s: float, stack: ExitStack) -> tuple[dict, dict]:
    """The agent and the bare client on the same server at the same time: (bare, agent) over the same window."""
    agent = Agent(server, workdir, PUBLISH_MS)
    stack.callback(agent.stop)
    agent.wait_readings(server.machines * 2)
    marks: list[tuple[float, int, float]] = []
    bare = bare_rate(server, window_s, lambda: marks.append((time.monotonic(), agent.rows()[0],
                                                              cpu_seconds(agent.process.pid))))
    (t0, n0, cpu0), (t1, n1, cpu1) = marks
    agent.stop()
    return bare, {"rate": (n1 - n0) / (t1 - t0), "cpu": (cpu1 - cpu0) / (t1 - t0),
                  "share": (n1 - n0) * len(INPUTS) / (bare["produced"] * (t1 - t0))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int)
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    window_s = 5.0 if args.quick else 15.0
    scale_s = 10.0 if args.quick else 30.0
    runs: dict[str, list] = {"bare": [], "agent": [], "scale": []}
    load = [os.getloadavg()[0]]
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="bench-opcua-") as tmp:
        for r in range(repeats):
            server = ServerProcess(RATE_MACHINES, 0.0)
            stack.callback(server.stop)
            bare, agent = rate_run(server, Path(tmp) / f"rate-{r}", window_s, stack)
            runs["bare"].append(bare)
            runs["agent"].append(agent)
            server.stop()
            server = ServerProcess(SCALE_MACHINES, 1.0)
            stack.callback(server.stop)
            runs["scale"].append(agent_run(server, Path(tmp) / f"scale-{r}", scale_s, 1000, stack))
            server.stop()
            print(f"run {r + 1}/{repeats}: " + json.dumps({k: v[-1] for k, v in runs.items()},
                                                          default=lambda x: round(x, 3)), file=sys.stderr)
        load.append(os.getloadavg()[0])

    def figure(phase: str, key: str, fmt: str = "{:,.0f}") -> str:
        return median_spread([run[key] for run in runs[phase]], fmt)

    ratios = [a["rate"] * len(INPUTS) / b["rate"] for a, b in zip(runs["agent"], runs["bare"])]
    items = SCALE_MACHINES * len(INPUTS)
    rows = [
        (f"rate: bare asyncua client, notifications/s ({RATE_MACHINES * len(INPUTS)} items)",
         figure("bare", "rate"), ""),
        (f"rate: agent, readings/s committed to SQLite ({RATE_MACHINES} machines × {len(INPUTS)} items)",
         figure("agent", "rate"), ""),
        ("rate: agent / bare (readings × 5 / notifications)", median_spread(ratios, "{:.2f}"), f"≥ {RATIO_GOAL}"),
        ("rate: server writes/s during the window", figure("bare", "produced"), ""),
        ("rate: share of the server's writes delivered, bare / agent",
         f"{figure('bare', 'share', '{:.2f}')} / {figure('agent', 'share', '{:.2f}')}", ""),
        ("rate: agent CPU (share of one core)", figure("agent", "cpu", "{:.0%}"), ""),
        (f"scale: {items:,} monitored items at 1 s, readings/s committed / machine rounds/s the server wrote",
         f"{figure('scale', 'rate')} / {figure('scale', 'produced')}", "all"),
        ("scale: share of the server's machine rounds stored", figure("scale", "share", "{:.2f}"), "1.00"),
        ("scale: newest committed reading's age (now − source timestamp), median / max",
         f"{figure('scale', 'lag_median', '{:.2f}')} / {figure('scale', 'lag_max', '{:.2f}')} s", ""),
        ("scale: agent RSS, median", figure("scale", "rss_median", "{:.0f}") + " MB", ""),
        ("scale: agent RSS, max", figure("scale", "rss_max", "{:.0f}") + " MB", f"≤ {RSS_GOAL_MB} MB"),
        ("scale: agent CPU (share of one core)", figure("scale", "cpu", "{:.0%}"), ""),
    ]
    body = "| figure | median (min–max) | goal |\n|---|---|---|\n" + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    body += (
        f"\n\n{repeats} runs{' (--quick)' if args.quick else ''}, each with fresh server processes and data folders. "
        f"Server: asyncua's Server (pure Python) in a separate process on 127.0.0.1, writing every variable every "
        f"round (rate: flat out; scale: every second). Rate: the agent and the bare client subscribe to the same "
        f"server at the same time and are counted over the same {window_s:g} s window (after 1 s of warm-up), "
        f"publishing and sampling every {PUBLISH_MS} ms, queue 10 per item, for both; the agent is `pdm-edge run` "
        f"(validation, ONNX scoring, SQLite with synchronous FULL) and its readings are counted in its database. "
        f"Scale window {scale_s:g} s. Server, agent and bare client share the machine's cores; load average (1 min) "
        f"at start / end: {load[0]:.2f} / {load[-1]:.2f} on {os.cpu_count()} cores.")
    command = "python -m bench.bench_opcua" + (" --quick" if args.quick else "")
    write_section("opcua", command, body, ("asyncua", "pydantic", "onnxruntime"))
    print(body)


if __name__ == "__main__":
    main()
