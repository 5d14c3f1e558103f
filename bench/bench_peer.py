"""Peer benchmark: pdm-edge and the ThingsBoard IoT Gateway side by side on the same MQTT workload.

Run: python -m bench.bench_peer [--quick]   (writes the `peer` section of BENCHMARKS.md and .bench/results/peer.json)

The peer is PyPI's `thingsboard-gateway` (PEER_VERSION) in its own virtual environment, .bench/peer-venv (git-ignored;
the full mode creates it, --quick runs the peer only when it exists). Its MQTT connector subscribes to the plant's
broker (QoS 1, a persistent session, a JSON converter mapping the five inputs and `seq`), its storage is SQLite, and
its server is a second throwaway Mosquitto standing in for ThingsBoard: the bench counts what arrives there on
`v1/gateway/telemetry` (ThingsBoard's gateway MQTT API) and answers the gateway's `getSessionLimits` RPC with "no
limits", as a ThingsBoard server would. pdm-edge runs `pdm-edge run` with its default config (validate, score,
commit in SQLite with synchronous = FULL, acknowledge after commit), its uplink a `pdm-central serve` on
PostgreSQL; a reading counts as delivered once committed in its buffer (what it syncs from: it forwards summaries,
not raw readings).

Phases, each on one long-running process per side (RSS sampled every 0.5 s throughout: the soak plot):
- ladder: each offered rate for a few seconds, climbing until the side stops keeping up (it loses a reading or
  delivers the last one more than KEPT_UP_S after its publish), so its sustained rate is measured, not floored by
  the ladder; then, for both sides alike, `refine` more steps each halving the gap between the highest rate kept
  up with and the lowest one not (7,500 and 10,000: 8,750, then 8,125 or 9,375); per step: delivered, lost (not delivered drain_s after the last publish), latency publish →
  delivered, CPU per reading (the process's user + system time over the step), and the rate the publisher achieved;
- uplink outage: 1,000 readings/s while the uplink (the server broker, or central) is down for OUTAGE_S seconds;
- kill -9: 1,000 readings/s, the process killed with SIGKILL and started again at once on the same data.
Every reading carries a sequence number (in its payload, and in its (machine, ts) for pdm-edge), so losses and
duplicates are counted exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench.bench_ingest import percentile, stop_process
from bench.report import ROOT, cpu_seconds, save_results, write_section
from testkit.mqtt import Mosquitto, Publisher
from testkit.net import free_port

PEER_PACKAGE = "thingsboard-gateway"
PEER_VERSION = "3.8.5"
PEER_VENV = ROOT / ".bench" / "peer-venv"
MACHINES = 20
T0 = 1_790_000_000
INPUTS = ("air_temperature", "process_temperature", "rotational_speed", "torque", "tool_wear")
OUTAGE_RATE = 1000
KEPT_UP_S = 2.0
DRAIN_CAP_S = 300.0
RSS_EVERY_S = 0.5
NO_LIMITS = {"messages": "0:0,", "telemetryMessages": "0:0,", "telemetryDataPoints": "0:0,"}


def message(seq: int) -> tuple[str, str]:
    machine, ts = seq % MACHINES, T0 + seq // MACHINES
    body = {"ts": ts, "seq": seq, "air_temperature": 300.0 + seq % 7 / 10, "process_temperature": 310.1,
            "rotational_speed": 1500 + seq % 50, "torque": 40.2, "tool_wear": seq % 200}
    return f"pdm/m{machine:02d}/telemetry", json.dumps(body)


def seq_of(machine_id: str, ts: float) -> int:
    return round(ts - T0) * MACHINES + int(machine_id[1:])


def rss_mb(pid: int) -> float:
    return next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith("VmRSS")) / 1024


def ensure_peer_venv() -> Path:
    """.bench/peer-venv with thingsboard-gateway; created (a few minutes, from PyPI) when missing."""
    python = PEER_VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {PEER_VENV} with {PEER_PACKAGE}=={PEER_VERSION}...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        f"{PEER_PACKAGE}=={PEER_VERSION}"], check=True)
    return PEER_VENV


class Side:
    """One gateway under test: start, kill -9, restart on the same data, stop; what it delivered, by seq."""

    name = ""

    @property
    def log(self) -> Path:
        raise NotImplementedError

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.delivered: dict[int, float] = {}  # seq -> first delivery time
        self.deliveries = 0  # including duplicates
        self.rss: list[tuple[float, float]] = []  # (time, MB), across restarts
        self.process: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample_rss, daemon=True)

    def start(self) -> None:
        raise NotImplementedError

    def ready_marks(self) -> int:
        """How many times it has said it is ready (grows by one per start)."""
        raise NotImplementedError

    def wait_ready(self, before: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.ready_marks() <= before:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start:\n{self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
        if not self._sampler.is_alive():
            self._sampler.start()

    def restart(self) -> None:
        before = self.ready_marks()
        self.start()
        self.wait_ready(before)

    def cpu(self) -> float:
        return cpu_seconds(self.process.pid)

    def kill9(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        self._stop.set()
        if self.process is not None:
            stop_process(self.process)

    def _sample_rss(self) -> None:
        while not self._stop.wait(RSS_EVERY_S):
            try:
                self.rss.append((time.time(), rss_mb(self.process.pid)))
            except (OSError, StopIteration):
                pass  # between a kill and the restart

    def delivered_between(self, first: int, last: int) -> dict[int, float]:
        # By key, not by iterating the dict, which the delivery thread may be growing meanwhile.
        return {seq: at for seq in range(first, last) if (at := self.delivered.get(seq)) is not None}


class Agent(Side):
    name = "pdm-edge"

    def __init__(self, workdir: Path, broker: Mosquitto, central_url: str, token: str) -> None:
        super().__init__(workdir)
        workdir.mkdir(parents=True)
        self.db_path = workdir / "data" / "agent.db"
        self.config = workdir / "agent.toml"
        self.config.write_text("\n".join([
            'gateway_id = "bench-peer"', f'data_dir = "{workdir / "data"}"', 'log_format = "json"', "[mqtt]",
            f'url = "{broker.url}"', f'client_id = "pdm-peer-{uuid.uuid4().hex[:8]}"', 'default_machine_type = "M"',
            "[central]", f'url = "{central_url}"', f'token = "{token}"', "sync_interval_s = 1",
            "[summary]", "window_s = 2", "grace_s = 1", "[status]", f'bind = "127.0.0.1:{free_port()}"']) + "\n")
        self._last_id = 0
        self._poller = threading.Thread(target=self._poll, daemon=True)

    @property
    def log(self) -> Path:
        return self.workdir / "agent.log"

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("PDM_") and k not in ("CREDENTIALS_DIRECTORY", "STATE_DIRECTORY", "NOTIFY_SOCKET")}
        with self.log.open("a") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(self.config)],
                                            cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT)

    def ready_marks(self) -> int:
        return self.log.read_text().count("subscribed to") if self.log.exists() else 0

    def wait_ready(self, before: int, timeout: float = 60) -> None:
        super().wait_ready(before, timeout)
        if not self._poller.is_alive():
            self._poller.start()

    def outbox_pending(self) -> int:
        with sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True) as db:
            return db.execute("SELECT count(*) FROM outbox WHERE synced_at IS NULL").fetchone()[0]

    def _poll(self) -> None:
        """Readings committed since the last poll: the first poll that sees one is its delivery time."""
        db = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True)
        while not self._stop.wait(0.02):
            rows = db.execute("SELECT id, machine_id, ts FROM readings WHERE id > ? ORDER BY id",
                              [self._last_id]).fetchall()
            now = time.time()
            for reading_id, machine_id, ts in rows:
                self.deliveries += 1
                self.delivered.setdefault(seq_of(machine_id, ts), now)
                self._last_id = reading_id
        db.close()


class ThingsBoard(Side):
    name = "ThingsBoard IoT Gateway"

    def __init__(self, workdir: Path, venv: Path, source: Mosquitto, uplink: Mosquitto) -> None:
        super().__init__(workdir)
        self.venv, self.uplink = venv, uplink
        self.config = workdir / "config"
        self.config.mkdir(parents=True)
        (workdir / "logs").mkdir()
        (workdir / "data").mkdir()
        site = next((venv / "lib").glob("python3*/site-packages/thingsboard_gateway"))
        (self.config / "logs.json").write_text((site / "config" / "logs.json").read_text())  # as shipped
        (self.config / "tb_gateway.json").write_text(json.dumps({
            "thingsboard": {"host": uplink.host, "port": uplink.port, "remoteShell": False,
                            "remoteConfiguration": False, "statistics": {"enable": False},
                            "security": {"type": "accessToken", "accessToken": "bench-peer"}, "qos": 1,
                            "minPackSendDelayMS": 50, "minPackSizeToSend": 500, "maxPayloadSizeBytes": 65536,
                            "checkConnectorsConfigurationInSeconds": 60},
            "storage": {"type": "sqlite", "data_file_path": f"{workdir / 'data'}/", "messages_ttl_check_in_hours": 1,
                        "messages_ttl_in_days": 7},
            "grpc": {"enabled": False},
            "connectors": [{"type": "mqtt", "name": "plant", "configuration": "mqtt.json"}]}))
        (self.config / "mqtt.json").write_text(json.dumps({
            "broker": {"host": source.host, "port": source.port, "clientId": f"tb-peer-{uuid.uuid4().hex[:8]}",
                       "version": 5, "maxMessageNumberPerWorker": 10, "maxNumberOfWorkers": 100,
                       "cleanSession": False, "cleanStart": False, "sessionExpiryInterval": 3600,
                       "security": {"type": "anonymous"}},
            "mapping": [{"topicFilter": "pdm/+/telemetry", "subscriptionQos": 1, "converter": {
                "type": "json",
                "deviceInfo": {"deviceNameExpressionSource": "topic",
                               "deviceNameExpression": "(?<=pdm/)(.*?)(?=/telemetry)",
                               "deviceProfileExpressionSource": "constant", "deviceProfileExpression": "default"},
                "timeseries": [{"type": "double", "key": k, "value": f"${{{k}}}"} for k in (*INPUTS, "seq")]}}]}))
        self.server = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"tb-server-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        self.server.on_connect = lambda client, *_: client.subscribe("v1/#", qos=1)
        self.server.on_message = self._on_uplink
        self.session_limits_sent = 0
        self.server.reconnect_delay_set(0.1, 1)
        # A persistent session on a broker with persistence: what the gateway sends while we reconnect after the
        # outage waits for us instead of being dropped (ThingsBoard itself receives it directly).
        self.server.connect(uplink.host, uplink.port, clean_start=False,
                            properties=_session_expiry(3600))
        self.server.loop_start()

    def start(self) -> None:
        env = {**os.environ, "TB_GW_CONFIG_DIR": f"{self.config}/"}
        with self.log.open("a") as out:
            self.process = subprocess.Popen([str(self.venv / "bin" / "thingsboard-gateway")], cwd=self.workdir,
                                            env=env, stdout=out, stderr=subprocess.STDOUT)

    @property
    def log(self) -> Path:
        return self.workdir / "gateway.out"

    def ready_marks(self) -> int:
        """Subscribed to the plant (its connector log says so) and its session limits answered."""
        subscribed = sum(log.read_text(errors="replace").count("subscription success")
                         for log in self.workdir.rglob("*connector*.log"))
        return min(subscribed, self.session_limits_sent)

    def stop(self) -> None:
        super().stop()
        self.server.disconnect()
        self.server.loop_stop()

    def _on_uplink(self, client, userdata, msg) -> None:
        now = time.time()
        if msg.topic.startswith("v1/devices/me/rpc/request/"):
            request = json.loads(msg.payload)
            if request.get("method") == "getSessionLimits":
                client.publish("v1/devices/me/rpc/response/" + msg.topic.rsplit("/", 1)[1], json.dumps(
                    {"rateLimits": NO_LIMITS, "gatewayRateLimits": NO_LIMITS, "maxPayloadSize": 65536,
                     "maxInflightMessages": 1000}), qos=1)
                self.session_limits_sent += 1
        elif msg.topic == "v1/gateway/telemetry":
            for entries in json.loads(msg.payload).values():
                for entry in entries:
                    self.deliveries += 1
                    self.delivered.setdefault(int(entry["values"]["seq"]), now)


def _session_expiry(seconds: int):
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = seconds
    return properties


@dataclass(frozen=True)
class Phases:
    rates: tuple[int, ...]  # the ladder's offered loads, readings/s
    step_s: float  # each rate for this long
    outage_s: float  # the uplink down for this long, at OUTAGE_RATE
    kill_s: float  # publishing at OUTAGE_RATE for this long, killed a third of the way in
    drain_s: float  # a reading not delivered when the side has delivered nothing for this long is lost
    outage_drain_s: float  # the same after the outage: a gateway may wait out its reconnect back-off first
    refine: int = 0  # after the climb, steps halving the gap between the last rate kept up with and the next


FULL = Phases((500, 1000, 2000, 3000, 5000, 7500, 10_000, 12_500, 15_000, 20_000), 10, 60, 15, 20, 50, refine=2)
QUICK = Phases((1000, 4000), 2, 5, 5, 5, 15)
REFINE_ROUND = 125  # readings/s: a refining step's rate is a multiple of this


class Load:
    """Publishes seq first..first+n at `rate` in a thread; published_at[seq] for the latencies."""

    def __init__(self, broker: Mosquitto) -> None:
        self.broker = broker
        self.next_seq = 0
        self.published_at: dict[int, float] = {}

    def run(self, rate: float, seconds: float, during=None) -> tuple[int, int]:
        """Publish rate × seconds readings (calling `during(elapsed_s)` from another thread meanwhile); (first, last)."""
        first, n = self.next_seq, int(rate * seconds)
        self.next_seq += n
        messages = [message(seq) for seq in range(first, first + n)]
        helper = threading.Thread(target=during, daemon=True) if during else None
        with Publisher(self.broker.url, client_id=f"bench-load-{uuid.uuid4().hex[:8]}") as publisher:
            if helper:
                helper.start()
            publisher.publish_all(messages, qos=1, rate=rate, timeout=120)
            self.published_at.update(zip(range(first, first + n), publisher.published_at, strict=True))
        if helper:
            helper.join()
        return first, first + n


def drain(side: Side, before: int, first: int, last: int, quiet_s: float) -> dict[int, float]:
    """What the side delivered of seq first..last-1 once it has all of them, or once it has delivered nothing for
    `quiet_s` (a slow side still catching up is waited for, up to DRAIN_CAP_S: what it never delivers is lost).
    `before`: how many seqs it had delivered before this phase (progress is watched on the count alone, which is
    cheap: the bench shares the cores with the side it measures)."""
    deadline = time.monotonic() + DRAIN_CAP_S
    seen, last_change = -1, time.monotonic()
    while (count := len(side.delivered)) < before + last - first:
        now = time.monotonic()
        if count != seen:
            seen, last_change = count, now
        elif now - last_change > quiet_s or now > deadline:
            break
        time.sleep(0.2)
    return side.delivered_between(first, last)


def ladder_step(side: Side, load: Load, rate: float, seconds: float, drain_s: float) -> dict:
    cpu0, deliveries0, before = side.cpu(), side.deliveries, len(side.delivered)
    first, last = load.run(rate, seconds)
    got = drain(side, before, first, last, drain_s)
    cpu1 = side.cpu()
    n = last - first
    publishing_s = load.published_at[last - 1] - load.published_at[first]
    latencies = sorted((at - load.published_at[seq]) * 1000 for seq, at in got.items())
    span = (max(got.values()) - load.published_at[first]) if got else float("inf")
    lag = (max(got.values()) - load.published_at[last - 1]) if got else float("inf")
    return {"offered": rate, "published": n, "delivered": len(got), "lost": n - len(got), "lag": lag,
            "duplicates": side.deliveries - deliveries0 - len(got), "achieved": len(got) / span,
            "published_rate": (n - 1) / publishing_s if publishing_s > 0 else float(n),
            "cpu_us": (cpu1 - cpu0) / max(len(got), 1) * 1e6,
            **{f"p{q}": percentile(latencies, q / 100) if latencies else None for q in (50, 90, 99)}}


def outage(side: Side, load: Load, seconds: float, drain_s: float, down, up) -> dict:
    """Publishing at OUTAGE_RATE: 3 s, then the uplink down for `seconds`, then 2 s with it back."""
    def during() -> None:
        time.sleep(3)
        down()
        time.sleep(seconds)
        up()

    before = len(side.delivered)
    first, last = load.run(OUTAGE_RATE, seconds + 5, during)
    got = drain(side, before, first, last, drain_s)
    return {"published": last - first, "delivered": len(got), "lost": last - first - len(got)}


def kill9(side: Side, load: Load, seconds: float, drain_s: float) -> dict:
    deliveries0, before = side.deliveries, len(side.delivered)

    def during() -> None:
        time.sleep(seconds / 3)
        side.kill9()
        side.restart()

    first, last = load.run(OUTAGE_RATE, seconds, during)
    got = drain(side, before, first, last, drain_s)
    return {"published": last - first, "delivered": len(got), "lost": last - first - len(got),
            "duplicates": side.deliveries - deliveries0 - len(got)}


def kept_up(step: dict) -> bool:
    """Nothing lost, and the last reading delivered within KEPT_UP_S of its publish."""
    return step["lost"] == 0 and step["lag"] <= KEPT_UP_S


def sustained(steps: list[dict]) -> float:
    """The highest offered rate kept up with."""
    return max((s["offered"] for s in steps if kept_up(s)), default=0)


def run_side(side: Side, load: Load, phases: Phases, down, up, settle=dict) -> dict:
    """The phases on one side; `settle()` runs before the side is stopped and adds to the result."""
    started = time.time()
    side.restart()
    steps = []
    for rate in phases.rates:  # climbing until the side stops keeping up
        steps.append(ladder_step(side, load, rate, phases.step_s, phases.drain_s))
        print(f"{side.name}: {steps[-1]}", file=sys.stderr)
        if not kept_up(steps[-1]):
            break
    for _ in range(phases.refine):  # then halving the gap between the last rate kept up with and the first not
        kept, missed = sustained(steps), min((s["offered"] for s in steps if not kept_up(s)), default=0)
        rate = round((kept + missed) / 2 / REFINE_ROUND) * REFINE_ROUND
        if not kept < rate < missed:
            break
        steps.append(ladder_step(side, load, rate, phases.step_s, phases.drain_s))
        print(f"{side.name}: {steps[-1]}", file=sys.stderr)
    result = {"steps": steps, "outage": outage(side, load, phases.outage_s, phases.outage_drain_s, down, up)}
    print(f"{side.name}: outage {result['outage']}", file=sys.stderr)
    result["kill9"] = kill9(side, load, phases.kill_s, phases.drain_s)
    print(f"{side.name}: kill -9 {result['kill9']}", file=sys.stderr)
    result.update(settle())
    side.stop()
    result["rss"] = [(t - started, mb) for t, mb in side.rss]
    return result


def run_agent(tmp: Path, stack: ExitStack, phases: Phases) -> dict:
    import psycopg

    from bench.bench_central import add_gateway, bench_database, start_server

    url, _ = bench_database(stack)
    _, token = add_gateway(url, "bench-peer")
    port = free_port()
    central = [start_server(url, tmp, port)[0]]
    stack.callback(lambda: stop_process(central[0]))
    broker = Mosquitto.start(tmp / "agent-broker")
    stack.callback(broker.stop)
    agent = Agent(tmp / "agent", broker, f"http://127.0.0.1:{port}", token)
    stack.callback(agent.stop)

    def down() -> None:
        stop_process(central[0])

    def up() -> None:
        central[0] = start_server(url, tmp, port)[0]

    def settle() -> dict:
        """The last windows close (window_s + grace_s after their last reading) and the outbox drains."""
        deadline = time.monotonic() + 30
        while (pending := agent.outbox_pending()) and time.monotonic() < deadline:
            time.sleep(0.5)
        with psycopg.connect(url) as conn:
            summaries = conn.execute("SELECT count(*) FROM summaries").fetchone()[0]
        return {"outbox_pending_after": pending, "central_summaries": summaries}

    return run_side(agent, Load(broker), phases, down, up, settle)


def run_peer(tmp: Path, stack: ExitStack, venv: Path, phases: Phases) -> dict:
    source = Mosquitto.start(tmp / "peer-broker")
    stack.callback(source.stop)
    # Persistence, so that a restart after the outage keeps our server client's session (see ThingsBoard.__init__);
    # `user root` keeps a root-started broker from dropping to a user who cannot write its folder.
    folder = tmp / "uplink"
    folder.mkdir()
    extra = f"user root\npersistence true\npersistence_location {folder}/\n"
    uplink = [Mosquitto.start(folder, extra_config=extra)]
    stack.callback(lambda: uplink[0].stop())
    peer = ThingsBoard(tmp / "peer", venv, source, uplink[0])
    stack.callback(peer.stop)

    def up() -> None:
        uplink[0] = Mosquitto.start(folder, port=uplink[0].port, extra_config=extra)

    return run_side(peer, Load(source), phases, lambda: uplink[0].stop(), up)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="two offered rates of 2 s, a 10 s outage; the peer only if .bench/peer-venv exists")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so that the ExitStack below stops what it started
    phases = QUICK if args.quick else FULL
    venv = PEER_VENV if args.quick else ensure_peer_venv()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-peer-") as tmp, ExitStack() as stack:
        results["agent"] = run_agent(Path(tmp), stack, phases)
        if (venv / "bin" / "thingsboard-gateway").exists():
            results["peer"] = run_peer(Path(tmp), stack, venv, phases)
    save_results("peer", {"rates": phases.rates, **results})
    body = report_body(results, phases, args.quick)
    write_section("peer", "python -m bench.bench_peer" + (" --quick" if args.quick else ""), body,
                  ("paho-mqtt", "onnxruntime"))
    print(body)


def report_body(results: dict, phases: Phases, quick: bool) -> str:
    step_s, outage_s = phases.step_s, phases.outage_s
    sides = [("agent", "pdm-edge"), ("peer", f"ThingsBoard IoT Gateway {PEER_VERSION}")]
    present = [(key, title) for key, title in sides if key in results]

    def row(label: str, value) -> str:
        return f"| {label} | " + " | ".join(value(results[key]) for key, _ in present) + " |"

    def step(r: dict, rate: int) -> dict | None:
        return next((s for s in r["steps"] if s["offered"] == rate), None)

    def at(rate: int, show):
        """A cell of the step at `rate`: "—" for a side whose ladder stopped below it."""
        return lambda r: "—" if (s := step(r, rate)) is None else show(s)

    agent_rate, peer_rate = (sustained(results[k]["steps"]) if k in results else 0 for k in ("agent", "peer"))

    lines = ["| figure | " + " | ".join(title for _, title in present) + " |",
             "|---|" + "---|" * len(present),
             row("each reading", lambda r: "validated, scored (ONNX), committed in SQLite (FULL), acked after commit"
                 if r is results["agent"] else "converted (JSON mapping), stored in SQLite, forwarded over MQTT"),
             row(f"sustained readings/s without loss (highest offered rate whose last reading was delivered within "
                 f"{KEPT_UP_S:g} s)",
                 lambda r: f"{sustained(r['steps']):,}")]
    if peer_rate:
        lines.append(f"| pdm-edge's sustained rate / the peer's (goal ≥ 5) | {agent_rate / peer_rate:.1f} | |")
    ran = sorted({s["offered"] for r in results.values() for s in r["steps"]})
    for rate in ran:
        lines.append(row(f"offered {rate:,}/s for {step_s:g} s: published/s; delivered/s; lost; delivered twice; "
                         "last delivered after the last publish", at(rate, lambda s: (
                             f"{s['published_rate']:,.0f}; {s['achieved']:,.0f}; {s['lost']:,} of "
                             f"{s['published']:,}; {s['duplicates']:,}; {s['lag']:.1f} s"))))
        lines.append(row(f"offered {rate:,}/s: latency publish → delivered p50 / p99", at(rate, lambda s: (
            "—" if s["p50"] is None else f"{s['p50']:,.0f} / {s['p99']:,.0f} ms"))))
        lines.append(row(f"offered {rate:,}/s: CPU per reading", at(rate, lambda s: f"{s['cpu_us']:,.0f} µs")))
    lines += [
        row("RSS over the whole run, median / max", lambda r: (
            f"{sorted(m for _, m in r['rss'])[len(r['rss']) // 2]:.0f} / {max(m for _, m in r['rss']):.0f} MB")),
        row(f"uplink down {outage_s:g} s at {OUTAGE_RATE:,}/s: readings lost", lambda r: (
            f"{r['outage']['lost']:,} of {r['outage']['published']:,}")),
        row(f"kill -9 and restart at {OUTAGE_RATE:,}/s: readings lost; delivered twice", lambda r: (
            f"{r['kill9']['lost']:,} of {r['kill9']['published']:,}; {r['kill9']['duplicates']:,}")),
    ]
    agent = results["agent"]
    text = "\n".join(lines) + (
        f"\n\nOne run of each phase{' (--quick)' if quick else ''}, both sides on the same machine in turn, each "
        "with its own throwaway Mosquitto (unlimited queues) fed by one paho publisher at QoS 1 (20 machines, the "
        "five inputs and a sequence number per reading). Delivered: pdm-edge — committed in its SQLite buffer (its "
        "uplink carries summaries: after the outage and the kill its outbox drained to "
        f"{agent['outbox_pending_after']} pending, {agent['central_summaries']:,} summaries at central); ThingsBoard — "
        "arrived on `v1/gateway/telemetry` at the broker standing in for its server. Lost: published (acknowledged "
        f"by the broker) and not delivered once the gateway has delivered nothing for {phases.drain_s:g} s "
        f"({phases.outage_drain_s:g} s after the outage, for its reconnect back-off); a gateway still catching up "
        "is waited for, so each phase starts with the previous one delivered. "
        "Latency: publish → delivered (pdm-edge: the first 20 ms poll of its database that sees the reading, an "
        "upper bound). CPU: user + system time of the gateway process over the step, per reading delivered. The "
        "uplink outage stops central (pdm-edge) or the server broker (ThingsBoard); kill -9 is SIGKILL of the "
        "gateway process, started again at once on the same data, with the plant broker keeping its QoS 1 "
        "session. ThingsBoard runs as shipped (its logs.json, SQLite storage, no rate limits); its config is "
        "written by `bench/bench_peer.py`.")
    if "peer" not in results:
        text += ("\n\nThe ThingsBoard IoT Gateway did not run: .bench/peer-venv does not exist (the full suite, "
                 "`./scripts/bench.sh`, creates it).")
    return text


if __name__ == "__main__":
    main()
