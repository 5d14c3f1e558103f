"""`pdm-edge`: the command line. Each command is a small function; exit codes: 0 ok, 1 problems found, 2 unusable
input or usage, or a command's extra (train, central) is not installed."""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import __version__
from web.extras import missing_extra

if TYPE_CHECKING:
    from drivers.simulator import Drift
    from model.score import Score
    from model.validate import Rejection

SCORE_BATCH = 256
MAX_LINE_CHARS = 10_000  # a reading is a few hundred; a longer line is not one


def _run(args: argparse.Namespace) -> int:
    from agent import service
    from agent.config import ConfigError, load_config
    from web import logs

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        return _problems(exc.problems)
    logs.setup(config.log_level, config.log_format)
    return service.run(config)


def _check_config(args: argparse.Namespace) -> int:
    """Everything `run` validates before it starts, without touching the network."""
    from agent.config import ConfigError, check_inputs, load_config, redacted
    from agent.downlink import FOLDER, STATE_FILE, State
    from model.bundle import trusted_keys
    from model.manifest import PackageError
    from model.package import SHIPPED, load
    from sync.remote import OverrideError, apply

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        return _problems(exc.problems)
    package = config.model.path or SHIPPED
    try:
        manifest = load(package).manifest
    except PackageError as exc:
        return _problems([f"model.path ({package}): {exc}"])
    problems = check_inputs(config, manifest.input_names, manifest.machine_type.name)
    try:
        trusted_keys(list(config.model.trusted_keys))
    except PackageError as exc:
        problems.append(f"model.trusted_keys: {exc}")
    if problems:
        return _problems(problems)
    remote = State.load(config.data_dir / FOLDER / STATE_FILE)  # what central set remotely, as last applied
    if remote.overrides:
        try:
            config = config.model_copy(update=apply(remote.overrides, {
                "alarms": config.alarms, "summary": config.summary, "central": config.central}))
        except OverrideError as exc:
            print(f"central's remembered overrides are refused, the file's values apply: {exc}", file=sys.stderr)
    print(json.dumps(redacted(config), indent=2))
    if remote.overrides:
        print(f"central overrides (config revision {remote.config_revision}) in force over the file: "
              + ", ".join(f"{key} = {json.dumps(value)}" for key, value in sorted(remote.overrides.items())),
              file=sys.stderr)
    print(f"ok: configuration valid; model {manifest.name} {manifest.version}", file=sys.stderr)
    return 0


def _problems(problems: list[str]) -> int:
    print(f"pdm-edge: {len(problems)} configuration problem{'s' if len(problems) > 1 else ''}:", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
    return 1


def _modbus_probe(args: argparse.Namespace) -> int:
    from drivers.probe import ProbeError, format_rows, probe

    try:
        rows = probe(address=args.address, count=args.count, table=args.table, unit_id=args.unit_id,
                     host=args.host, port=args.port, serial_port=args.serial_port, baudrate=args.baudrate,
                     parity=args.parity, stopbits=args.stopbits, timeout_s=args.timeout, scale=args.scale,
                     offset=args.offset)
    except (ProbeError, ValueError) as exc:
        print(f"pdm-edge modbus probe: {exc}", file=sys.stderr)
        return 1
    print(format_rows(rows, args.expect))
    return 0


def _model_info(args: argparse.Namespace) -> int:
    from model.manifest import Manifest

    manifest = Manifest.load(args.package)
    if args.json:
        print(manifest.model_dump_json(indent=2))
        return 0
    test = manifest.metrics.get("test", {})
    failure = test.get("failure", {})
    print(f"{manifest.name} {manifest.version}  sha256 {manifest.onnx.sha256}")
    print(manifest.description)
    print(f"\n{'input':<22}{'unit':<6}{'physical range':>22}{'training range':>22}")
    for i in manifest.inputs:
        print(f"{i.name:<22}{i.unit:<6}{i.physical_range.min:>10g} .. {i.physical_range.max:<8g}"
              f"{i.training_range.min:>12g} .. {i.training_range.max:<8g}")
    print(f"{manifest.machine_type.name:<22}one of {', '.join(manifest.machine_type.values)}")
    t = manifest.thresholds
    print(f"\nstates: ok below p_failure {t.warning:.4f}, warning from {t.warning:.4f}, alarm from {t.alarm:.4f}")
    if failure:
        alarm = failure["alarm"]
        print(f"test split ({test['rows']} readings, {test['failures']} failures): ROC-AUC {failure['roc_auc']}, "
              f"PR-AUC {failure['pr_auc']}, recall at 1% false positives {failure['recall_at_1pct_fpr']}, "
              f"at the alarm threshold precision {alarm['precision']} recall {alarm['recall']} F1 {alarm['f1']}")
        print("per mode F1: " + ", ".join(f"{m} {v['at_threshold']['f1']}" for m, v in test["modes"].items()))
    print(f"trained with: {manifest.training.command}")
    return 0


def _model_verify(args: argparse.Namespace) -> int:
    from model.package import load

    model = load(args.package)
    print(f"ok: {model.name} {model.version}, sha256 {model.sha256}, package digest {model.package_digest}, "
          f"{len(model.manifest.inputs)} inputs")
    return 0


def _model_evaluate(args: argparse.Namespace) -> int:
    from model import data, evaluate
    from model.package import load
    from model.precision import differences

    model = load(args.package)
    dataset = data.load(args.data)
    if dataset.sha256 != model.manifest.dataset.sha256:
        print(f"note: {args.data} is not the file the model was evaluated on "
              f"(sha256 {dataset.sha256}, manifest {model.manifest.dataset.sha256})", file=sys.stderr)
    _, test_idx = data.split(dataset, model.manifest.training.seed)
    metrics = evaluate.evaluate(model, dataset, test_idx)
    print(json.dumps(metrics, indent=2))
    differ = differences(model.manifest.metrics.get("test"), metrics)
    if differ:
        print(f"these metrics differ from the manifest's: {'; '.join(differ)}", file=sys.stderr)
        return 1
    print("these are the manifest's metrics (at its stated precision)", file=sys.stderr)
    return 0


class MalformedLine:
    """A line of input that could not be parsed: reported as a rejection, not fatal."""

    def __init__(self, message: str) -> None:
        self.message = message


class UnusableStream(Exception):
    """The input as a whole cannot be scored (a CSV without the model's columns)."""


def _lines(stream: io.TextIOBase) -> Iterator[str]:
    """The stream's lines, a byte-order mark at a line's start dropped; a line longer than MAX_LINE_CHARS is read
    no further (its first MAX_LINE_CHARS + 1 characters stand for it, so no line can fill the memory)."""
    while line := stream.readline(MAX_LINE_CHARS + 1):
        if len(line) > MAX_LINE_CHARS and not line.endswith("\n"):
            while (rest := stream.readline(MAX_LINE_CHARS)) and not rest.endswith("\n"):
                pass
        yield line.lstrip("\ufeff")


def _too_long(line: str) -> MalformedLine | None:
    if len(line.rstrip("\r\n")) > MAX_LINE_CHARS:
        return MalformedLine(f"line longer than {MAX_LINE_CHARS:,} characters: not a reading")
    return None


def _json_line(line: str) -> object:
    text = line.rstrip("\r\n")
    try:
        return _too_long(line) or json.loads(text)
    except json.JSONDecodeError as exc:  # not its line and column: the reading is one line
        where = "the end of the line" if exc.pos >= len(text) else f"character {exc.pos + 1}"
        return MalformedLine(f"not JSON: {exc.msg} at {where}")
    except ValueError as exc:
        return MalformedLine(f"not JSON: {exc}")
    except RecursionError:
        return MalformedLine("not JSON: nested too deeply")


def _csv_row(line: str) -> list[str] | MalformedLine:
    try:
        return _too_long(line) or next(csv.reader([line.rstrip("\r\n")]), [])
    except csv.Error as exc:
        return MalformedLine(f"not CSV: {exc}")


def _readings(stream: io.TextIOBase, fmt: str, column_map: dict[str, str]) -> Iterator[object]:
    """Raw readings from JSON lines or CSV, one a line; a line that cannot be parsed becomes a MalformedLine. In
    auto format the input is CSV when its first line reads as a header of two or more columns, else JSON lines."""
    lines = _lines(stream)
    first = next(lines, "")
    while first and not first.strip():
        first = next(lines, "")
    if not first:
        return
    header = _csv_row(first) if fmt != "jsonl" else None
    if header is None or (fmt == "auto" and (first.lstrip().startswith(("{", "[")) or isinstance(header, MalformedLine)
                                             or len(header) < 2)):
        for line in itertools.chain([first], lines):
            if line.strip():
                yield _json_line(line)
        return
    if isinstance(header, MalformedLine):
        raise UnusableStream(f"the CSV header is unreadable: {header.message}")
    missing = sorted(set(column_map) - set(header))
    if missing:
        raise UnusableStream(f"the CSV header lacks the columns {', '.join(missing)}")
    for line in lines:
        if not line.strip():
            continue
        row = _csv_row(line)
        if isinstance(row, MalformedLine):
            yield row
        elif len(row) > len(header):
            yield MalformedLine(f"{len(row)} CSV fields, the header has {len(header)}")
        else:
            yield {column_map.get(k, k): _cell(v) for k, v in zip(header, row)}


def _cell(text: str | None) -> object:
    if text is None or not text.strip():
        return None
    try:
        return float(text)
    except ValueError:
        return text


def _model_score(args: argparse.Namespace) -> int:
    from model.package import load
    from model.score import Scorer
    from model.validate import Reason, Rejection

    scorer = Scorer(load(args.package))
    manifest = scorer.model.manifest
    column_map = {i.source_column: i.name for i in manifest.inputs}
    column_map[manifest.machine_type.source_column] = manifest.machine_type.name
    model_id = f"{manifest.name} {manifest.version}"
    stream = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace")
    out = sys.stdout
    batch: list[object] = []
    line = 0

    def flush() -> None:
        nonlocal line
        parsed = [None if isinstance(r, MalformedLine) else r for r in batch]
        for raw, result in zip(batch, scorer.score(parsed)):
            line += 1
            if isinstance(raw, MalformedLine):
                result = Rejection(Reason.MALFORMED, raw.message)
            out.write(json.dumps(_result_json(line, raw, result, model_id)) + "\n")
        batch.clear()

    try:
        for reading in _readings(stream, args.format, column_map):
            batch.append(reading)
            if len(batch) >= SCORE_BATCH:
                flush()
        flush()
    except UnusableStream as exc:
        print(f"pdm-edge model score: {exc}", file=sys.stderr)
        return 2
    return 0


def _result_json(line: int, raw: object, result: Score | Rejection, model_id: str) -> dict[str, Any]:
    from model.validate import Rejection

    echo = {k: raw[k] for k in ("machine_id", "ts") if isinstance(raw, dict) and k in raw}
    if isinstance(result, Rejection):
        return {"line": line, **echo, "rejected": {"reason": result.reason.value, "message": result.message,
                                                   "input": result.input}}
    return {
        "line": line, **echo,
        "state": result.state.value,
        "health": result.health,
        "p_failure": round(result.p_failure, 6),
        "risk": {m: round(p, 6) for m, p in result.risk.items()},
        "dominant_mode": result.dominant_mode,
        "ood": list(result.ood),
        "model": model_id,
    }


def _train(args: argparse.Namespace) -> int:
    from model import train

    command = "pdm-edge " + shlex.join(sys.argv[1:])
    manifest = train.train(args.data, args.out, command, log=lambda m: print(m, file=sys.stderr), seed=args.seed,
                           trees=args.trees, version=args.model_version)
    failure = manifest.metrics["test"]["failure"]
    print(f"wrote {args.out}/model.onnx and manifest.json: test ROC-AUC {failure['roc_auc']}, "
          f"PR-AUC {failure['pr_auc']}, F1 at alarm {failure['alarm']['f1']}")
    return 0


def _drift(args: argparse.Namespace) -> Drift | None:
    from agent.demo import parse_drift

    try:
        return parse_drift(args.drift, args.drift_minutes)
    except ValueError as exc:
        print(f"pdm-edge {args.command}: --drift: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _simulate_modbus(args: argparse.Namespace) -> int:
    from agent.demo import simulate_server

    return simulate_server("modbus", args.machines, args.port, args.host, _drift(args), args.seed, args.interval)


def _simulate_mqtt(args: argparse.Namespace) -> int:
    from agent.demo import simulate_mqtt

    return simulate_mqtt(args.machines, args.url, _drift(args), args.seed, args.interval)


def _simulate_opcua(args: argparse.Namespace) -> int:
    from agent.demo import simulate_server
    from agent.opcua_cli import missing_extra

    if missing_extra("simulate opcua"):
        return 2
    return simulate_server("opcua", args.machines, args.port, args.host, _drift(args), args.seed, args.interval)


def _demo(args: argparse.Namespace) -> int:
    from agent.demo import demo
    from agent.opcua_cli import missing_extra

    if args.protocol == "opcua" and missing_extra("demo --protocol opcua"):
        return 2
    return demo(args.machines, _drift(args), args.seed, args.central, args.data_dir, args.status_port,
                protocol=args.protocol)


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _plant_options(sub: argparse.ArgumentParser, drift: str | None) -> None:
    def machines(text: str) -> int:
        value = int(text)
        if not 1 <= value <= 247:
            raise argparse.ArgumentTypeError("1 to 247 machines (one Modbus unit id each)")
        return value

    sub.add_argument("--machines", type=machines, default=5, help="how many machines, m1..mN (default %(default)s)")
    sub.add_argument("--drift", default=drift, metavar="MACHINE:MODE",
                     help="drive one machine towards HDF, PWF, OSF or TWF, e.g. m3:OSF; none: no drift"
                          + (" (default %(default)s)" if drift else ""))
    sub.add_argument("--drift-minutes", type=_positive, default=1.5,
                     help="how long the drift takes to pass its failure condition fully (default %(default)s)")
    sub.add_argument("--seed", type=int, default=0, help="random seed of the plant (default %(default)s)")


def parser() -> argparse.ArgumentParser:
    from agent import opcua_cli, status_cli
    from model import data
    from model.package import SHIPPED
    from model.train import SEED, TREES, VERSION

    root = argparse.ArgumentParser(prog="pdm-edge", description=__doc__.split("\n")[0])
    root.add_argument("--version", action="version", version=f"pdm-edge {__version__}")
    commands = root.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the agent in the foreground (what systemd starts)")
    run.add_argument("--config", type=Path, help="the TOML file (default $PDM_CONFIG or /etc/pdm-edge/agent.toml)")
    run.set_defaults(handler=_run)

    check = commands.add_parser("check-config", help="validate the configuration, secrets and model; print it redacted")
    check.add_argument("--config", type=Path, help="the TOML file (default $PDM_CONFIG or /etc/pdm-edge/agent.toml)")
    check.set_defaults(handler=_check_config)

    model = commands.add_parser("model", help="the model package: info, verify, score, evaluate")
    model_commands = model.add_subparsers(dest="model_command", required=True)
    info = model_commands.add_parser("info", help="show the manifest")
    info.add_argument("--json", action="store_true", help="the whole manifest as JSON")
    verify = model_commands.add_parser("verify", help="check the ONNX file's hash and graph against the manifest")
    score = model_commands.add_parser(
        "score", help="score readings from stdin (JSON lines, or CSV with the AI4I column names): one JSON line each"
    )
    score.add_argument("--format", choices=("auto", "jsonl", "csv"), default="auto")
    evaluate = model_commands.add_parser("evaluate", help="recompute the test metrics from the ONNX file and the CSV")
    evaluate.add_argument("--data", type=Path, default=data.default_path(),
                          help=f"the AI4I 2020 CSV (default ${data.DATA_ENV} or %(default)s)")
    for sub, handler in ((info, _model_info), (verify, _model_verify), (score, _model_score),
                         (evaluate, _model_evaluate)):
        sub.add_argument("package", nargs="?", type=Path, default=SHIPPED,
                         help="a model package folder (default: the shipped one)")
        sub.set_defaults(handler=handler)

    status_cli.add_command(commands)
    opcua_cli.add_command(commands)

    modbus = commands.add_parser("modbus", help="Modbus tools")
    modbus_commands = modbus.add_subparsers(dest="modbus_command", required=True)
    probe = modbus_commands.add_parser(
        "probe", help="read registers and print every interpretation (type, word and byte order, scale)")
    where = probe.add_mutually_exclusive_group(required=True)
    where.add_argument("--host", help="Modbus TCP device address")
    where.add_argument("--serial-port", help="Modbus RTU serial line, e.g. /dev/ttyUSB0")
    probe.add_argument("--port", type=int, default=502)
    probe.add_argument("--baudrate", type=int, default=19200)
    probe.add_argument("--parity", choices=("N", "E", "O"), default="E")
    probe.add_argument("--stopbits", type=int, choices=(1, 2), default=1)
    probe.add_argument("--unit-id", type=int, default=1)
    probe.add_argument("--address", type=int, required=True, help="first register (0-based)")
    probe.add_argument("--count", type=int, default=4, help="registers to read (1-125)")
    probe.add_argument("--table", choices=("holding", "input"), default="holding")
    probe.add_argument("--scale", type=float, default=1.0, help="value = register * scale + offset")
    probe.add_argument("--offset", type=float, default=0.0, help="value = register * scale + offset")
    probe.add_argument("--timeout", type=float, default=2.0, help="seconds")
    probe.add_argument("--expect", type=float, help="the number the machine's display shows: matching rows are marked")
    probe.set_defaults(handler=_modbus_probe)

    simulate = commands.add_parser(
        "simulate", help="the plant simulator: a Modbus TCP server, an MQTT publisher or an OPC UA server")
    simulate_commands = simulate.add_subparsers(dest="simulate_command", required=True)
    sim_modbus = simulate_commands.add_parser(
        "modbus", help="serve N machines over Modbus TCP, one unit id each (layout: drivers/simulator_modbus.py)")
    sim_modbus.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    sim_modbus.add_argument("--port", type=int, default=5020, help="TCP port (default %(default)s)")
    sim_mqtt = simulate_commands.add_parser(
        "mqtt", help="publish N machines' readings on pdm/<machine_id>/telemetry, QoS 1")
    sim_mqtt.add_argument("--url", default="mqtt://127.0.0.1:1883", help="the broker (default %(default)s)")
    sim_opcua = simulate_commands.add_parser(
        "opcua", help="serve N machines over OPC UA, ns=2;s=<machine>.<input> (extra `opcua`)")
    sim_opcua.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    sim_opcua.add_argument("--port", type=int, default=4840, help="TCP port (default %(default)s)")
    for sub, handler in ((sim_modbus, _simulate_modbus), (sim_mqtt, _simulate_mqtt), (sim_opcua, _simulate_opcua)):
        _plant_options(sub, None)
        sub.add_argument("--interval", type=_positive, default=1.0, help="seconds between readings (default 1)")
        sub.set_defaults(handler=handler)

    demo = commands.add_parser(
        "demo", help="the plant simulator and the agent on it, one machine drifting; a live table; Ctrl-C stops")
    _plant_options(demo, "m3:OSF")
    demo.add_argument("--central", metavar="URL",
                      help="sync to this central API (token from PDM_CENTRAL__TOKEN[_FILE]); default: no sync")
    demo.add_argument("--data-dir", type=Path, help="keep the agent's data here (default: a temporary folder)")
    demo.add_argument("--protocol", choices=("modbus", "opcua"), default="modbus",
                      help="how the agent reads the simulator (default %(default)s; opcua: extra `opcua`)")
    demo.add_argument("--status-port", type=int, default=8080,
                      help="status page port on 127.0.0.1, or the next free one (default %(default)s)")
    demo.set_defaults(handler=_demo)

    train = commands.add_parser("train", help="train and export a model package (extra `train`)")
    train.add_argument("--data", type=Path, default=data.default_path(), help="the AI4I 2020 CSV")
    train.add_argument("--out", type=Path, required=True, help="the package folder to write")
    train.add_argument("--seed", type=int, default=SEED,
                       help="random seed of the split, the folds and the trees (default %(default)s: the shipped model)")
    train.add_argument("--trees", type=_count, default=TREES,
                       help="trees of the failure forest, each mode half as many (default %(default)s: the shipped "
                            "model; fewer: quicker, weaker)")
    train.add_argument("--model-version", default=VERSION,
                       help="the package's version (default %(default)s); a model to roll out needs its own")
    train.set_defaults(handler=_train)
    return root


def main(argv: list[str] | None = None) -> int:
    from model.manifest import PackageError

    args = parser().parse_args(argv)
    try:
        code: int = args.handler(args)
        return code
    except PackageError as exc:
        print(f"pdm-edge: {exc}", file=sys.stderr)
        return 1
    except FileNotFoundError as exc:
        print(f"pdm-edge: {exc.filename}: no such file", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        return missing_extra(_command_name(args), exc)


def _command_name(args: argparse.Namespace) -> str:
    """`pdm-edge model evaluate`: the command and its sub-command as typed."""
    words = [getattr(args, key, None) for key in ("command", "model_command", "modbus_command", "simulate_command")]
    return " ".join(["pdm-edge", *(w for w in words if w)])


if __name__ == "__main__":
    sys.exit(main())
