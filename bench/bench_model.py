"""Model benchmark: ONNX latency and throughput, validate-and-score throughput, RSS after loading.

Run: python -m bench.bench_model [--quick] [--repeats N]   (writes the `model` section of BENCHMARKS.md)

The limit each figure is bounded by is measured in the same run: a plain onnxruntime InferenceSession of the same
ONNX file (one intra-op thread, like the agent's) running the same float32 batch.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.report import median_spread, table, write_section

RSS_SCRIPT = """
from model.package import load
from model.score import Scorer
scorer = Scorer(load())
scorer.score([{"machine_type": "L", "air_temperature": 300.0, "process_temperature": 310.0,
               "rotational_speed": 1500, "torque": 40.0, "tool_wear": 10}])
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")))
"""


def synthetic_readings(n: int, seed: int = 1) -> list[dict]:
    """Readings spread over the training ranges (not rows of the data set)."""
    rng = np.random.default_rng(seed)
    air = rng.normal(300, 2, n).round(1)
    return [
        {"machine_id": f"m{i % 50}", "machine_type": "LMH"[i % 3], "air_temperature": float(air[i]),
         "process_temperature": float(round(air[i] + rng.normal(10, 1), 1)),
         "rotational_speed": int(rng.normal(1540, 180)), "torque": float(round(rng.normal(40, 10), 1)),
         "tool_wear": int(rng.integers(0, 250))}
        for i in range(n)
    ]


def bench_latency(model, valid, rounds: int = 2000) -> tuple[float, float]:
    values, types = valid.values[:1], valid.machine_types[:1]
    for _ in range(200):
        model.predict(values, types)
    times = []
    for i in range(rounds):
        row = i % len(valid.values)
        values, types = valid.values[row:row + 1], valid.machine_types[row:row + 1]
        start = time.perf_counter_ns()
        model.predict(values, types)
        times.append(time.perf_counter_ns() - start)
    return float(np.percentile(times, 50)) / 1000, float(np.percentile(times, 99)) / 1000


def rate(function, items: int, seconds: float = 1.0) -> float:
    function()
    done, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        function()
        done += items
    return done / elapsed


def raw_session(onnx_path):
    """A plain onnxruntime session of the same file with the agent's thread settings: the limit of scoring."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def onnx_profile(onnx_path, values, types, rounds: int = 50) -> str:
    """Where a batch's time goes inside the graph: onnxruntime's own profiler, µs per batch by node, top 5."""
    import json
    import tempfile

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as folder:
        options.profile_file_prefix = f"{folder}/ort"
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        feed = dict(zip([i.name for i in session.get_inputs()], (values, types), strict=True))
        for _ in range(rounds):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    per_node: dict[str, float] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            node = event["name"].removesuffix("_kernel_time")
            per_node[node] = per_node.get(node, 0.0) + event["dur"] / rounds
    top = sorted(per_node.items(), key=lambda item: -item[1])[:5]
    return (f"onnxruntime profile, µs per batch of {len(values):,} (of {sum(per_node.values()):,.0f} in all): "
            + ", ".join(f"{node} {us:,.0f}" for node, us in top))


def score_profile(scorer, batch: list[dict], rounds: int = 200) -> str:
    """Where validate + score's time goes: cProfile, µs of own time per batch, top 5 functions."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(rounds):
        scorer.score(batch)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]  # {(file, line, function): (calls, ncalls, own, cumulative, callers)}
    total = sum(own for _, _, own, _, _ in stats.values())
    top = sorted(stats.items(), key=lambda item: -item[1][2])[:5]
    return (f"cProfile of validate + score, µs of own time per batch of {len(batch)} (of {total / rounds * 1e6:,.0f} "
            "in all): " + ", ".join(f"{Path(file).name}:{function} {own / rounds * 1e6:,.0f}"
                                    for (file, _, function), (_, _, own, _, _) in top))


def rss_after_load_mb() -> float:
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT], capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) / 1024


def main() -> None:
    from model.package import load
    from model.score import Scorer

    args = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    args.add_argument("--quick", action="store_true", help="1 run, shorter timings")
    args.add_argument("--repeats", type=int)
    options = args.parse_args()
    repeats = options.repeats or (1 if options.quick else 5)
    seconds = 0.3 if options.quick else 1.0

    scorer = Scorer(load(threads=1))
    model = scorer.model
    readings = synthetic_readings(1024 * 8)
    valid, rejected = scorer.validator.validate(readings)
    assert not rejected and len(valid.index) == len(readings)

    raw = raw_session(model.package / model.manifest.onnx.file)
    names = [i.name for i in raw.get_inputs()]

    def raw_run(n: int):
        feed = dict(zip(names, (valid.values[:n], valid.machine_types[:n]), strict=True))
        return lambda: raw.run(None, feed)

    p50, p99, onnx_rate, raw_rate, score_rate, raw_256, rss = [], [], [], [], [], [], []
    for _ in range(repeats):
        a, b = bench_latency(model, valid, rounds=500 if options.quick else 2000)
        p50.append(a)
        p99.append(b)
        values, types = valid.values[:1024], valid.machine_types[:1024]
        raw_rate.append(rate(raw_run(1024), 1024, seconds))
        onnx_rate.append(rate(lambda v=values, t=types: model.predict(v, t), 1024, seconds))
        batch = readings[:256]
        raw_256.append(rate(raw_run(256), 256, seconds))
        score_rate.append(rate(lambda b=batch: scorer.score(b), 256, seconds))
        rss.append(rss_after_load_mb())
    profiles = [onnx_profile(model.package / model.manifest.onnx.file, valid.values[:1024],
                             valid.machine_types[:1024]),
                score_profile(scorer, readings[:256])]
    onnx_ratio = [a / b for a, b in zip(onnx_rate, raw_rate, strict=True)]
    score_ratio = [a / b for a, b in zip(score_rate, raw_256, strict=True)]

    rows = [
        ("ONNX scoring latency, batch 1, p50", median_spread(p50, "{:.1f}") + " µs", ""),
        ("ONNX scoring latency, batch 1, p99", median_spread(p99, "{:.1f}") + " µs", ""),
        ("ONNX throughput, batch 1,024, one thread", median_spread(onnx_rate) + " rows/s", "≥ 300,000"),
        ("raw onnxruntime session.run, same batch of 1,024", median_spread(raw_rate) + " rows/s", ""),
        ("ONNX throughput / raw onnxruntime, batch 1,024", median_spread(onnx_ratio, "{:.2f}"), ""),
        ("validate + score dict readings, batch 256", median_spread(score_rate) + " readings/s", "≥ 100,000"),
        ("raw onnxruntime session.run, the same 256 rows as float32 arrays", median_spread(raw_256) + " rows/s", ""),
        ("validate + score / raw onnxruntime, batch 256", median_spread(score_ratio, "{:.2f}"), ""),
        ("RSS after loading the model and scoring once", median_spread(rss, "{:.1f}") + " MB", "≤ 80"),
    ]
    body = table(rows)
    onnx = model.package / model.manifest.onnx.file
    estimators = model.manifest.training.estimators
    body += (f"\n\n{repeats} runs. Model: {model.name} {model.version}, {onnx.stat().st_size / 1024:.0f} kB of ONNX: "
             f"machine failure by {estimators['failure']}; each mode by {estimators['HDF']}; in one graph. "
             "Readings are synthetic, spread over the training ranges. onnxruntime with intra_op_num_threads=1. "
             "Raw: a plain InferenceSession of the same file, same thread settings, fed the arrays the validator "
             "produced; validate + score starts from dict readings (validation, float32 arrays, scoring, health).")
    body += "\n\n" + "\n".join(f"Profile: {profile}  " for profile in profiles).rstrip()
    command = "python -m bench.bench_model" + (" --quick" if options.quick else "")
    write_section("model", command, body,
                  ("onnxruntime", "numpy", "pydantic"))
    print(body)


if __name__ == "__main__":
    main()
