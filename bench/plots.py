"""The suite's plots, as PNG under bench/plots/, from the samples the benches keep in .bench/results/ (matplotlib, in
the dev extra). The peer bench's ladder and soak give all three: throughput and latency against offered load, and
RSS over the run, for pdm-edge and the ThingsBoard IoT Gateway.

Run: python -m bench.plots   (python -m bench runs it after the benches)
"""

from __future__ import annotations

import sys

from bench.report import load_results, plots_dir

SIDES = (("agent", "pdm-edge", "tab:blue"), ("peer", "ThingsBoard IoT Gateway", "tab:orange"))


def draw() -> list[str]:
    """Draw what the results allow; the names of the files written."""
    results = load_results("peer")
    if results is None:
        print("no results of bench_peer in .bench/results: no plots", file=sys.stderr)
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir().mkdir(parents=True, exist_ok=True)
    sides = [(key, label, color) for key, label, color in SIDES if key in results]
    written = []

    figure, axes = plt.subplots(figsize=(7, 4.5))
    rates = sorted({s["offered"] for key, _, _ in sides for s in results[key]["steps"]})
    axes.plot(rates, rates, linestyle=":", color="grey", label="offered")
    for key, label, color in sides:
        steps = sorted(results[key]["steps"], key=lambda s: s["offered"])  # refining steps come last
        axes.plot([s["offered"] for s in steps], [s["achieved"] for s in steps], marker="o", color=color,
                  label=label)
    axes.set(xlabel="offered load, readings/s (MQTT QoS 1)", ylabel="delivered, readings/s",
             title="Throughput against offered load")
    axes.grid(alpha=0.3)
    axes.legend()
    written.append(_save(figure, "ingest-throughput.png"))

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for key, label, color in sides:
        steps = sorted((s for s in results[key]["steps"] if s["p50"] is not None), key=lambda s: s["offered"])
        for q, style in (("p50", "-"), ("p90", "--"), ("p99", ":")):
            axes.plot([s["offered"] for s in steps], [s[q] for s in steps], style, marker="o", color=color,
                      label=f"{label} {q}")
    axes.set(xlabel="offered load, readings/s", ylabel="publish → delivered, ms", yscale="log",
             title="Latency percentiles")
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize="small")
    written.append(_save(figure, "ingest-latency.png"))

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for key, label, color in sides:
        rss = results[key]["rss"]
        axes.plot([t for t, _ in rss], [mb for _, mb in rss], color=color, label=label)
    axes.set(xlabel="s since start (ladder, then uplink outage, then kill -9 and restart)", ylabel="RSS, MB",
             title="RSS over the run")
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend()
    written.append(_save(figure, "rss-soak.png"))
    return written


def _save(figure, name: str) -> str:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(plots_dir() / name, dpi=100)
    plt.close(figure)
    return name


if __name__ == "__main__":
    print("\n".join(draw()))
