"""A PNG of a benchmark results JSON: one panel per benchmark, one bar per path, log time axis.

    python -m hiflow_fast.bench.plot bench/results/<run>.json plot.png [--overwrite]
    hiflow-fast bench all ... --plot plot.png           (the benchmarks call it themselves)

Needs matplotlib (`pip install matplotlib`, or the package's `bench` extra); without it a clear
error says so. Records that were skipped (no median) are left out; the title names the device
and says "CPU" for CPU runs, so a CPU plot is never mistaken for a GPU result.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

from hiflow_fast.errors import HiFlowInputError


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise HiFlowInputError(
            "--plot", "PNG", "a machine with matplotlib installed: pip install matplotlib (or 'hiflow-fast[bench]')"
        ) from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _label(record: dict[str, Any]) -> str:
    if record.get("label"):
        return str(record["label"])
    if record.get("latent_hw") is not None:
        return "x".join(str(v) for v in record["latent_hw"])
    return str(record.get("stage", ""))


def _title(records: list[dict[str, Any]]) -> str:
    devices = sorted({f"{r.get('device', '?')}: {r.get('device_name', '?')}" for r in records})
    text = "; ".join(devices)
    if any(r.get("device") == "cpu" for r in records):
        text += " -- CPU timings, not GPU results"
    return text


def plot_records(records: list[dict[str, Any]], path: str | Path, *, title: str | None = None, overwrite: bool = False) -> None:
    """Write a PNG of `records` (median seconds per label and path; whiskers min..max)."""
    from hiflow_fast.io import atomic_write

    plt = _pyplot()
    timed = [r for r in records if isinstance(r.get("median_s"), (int, float))]
    if not timed:
        raise HiFlowInputError("records", f"{len(records)} records", "at least one record with a median_s")
    benches: "OrderedDict[str, list[dict[str, Any]]]" = OrderedDict()
    for r in timed:
        benches.setdefault(str(r.get("name", "?")), []).append(r)
    fig, axes = plt.subplots(len(benches), 1, figsize=(10, 3.2 * len(benches)), squeeze=False)
    for ax, (name, rows) in zip(axes[:, 0], benches.items()):
        labels = list(OrderedDict.fromkeys(_label(r) for r in rows))
        paths = list(OrderedDict.fromkeys(str(r.get("path", "?")) for r in rows))
        width = 0.8 / len(paths)
        for k, p in enumerate(paths):
            xs, ys, lo, hi = [], [], [], []
            for i, label in enumerate(labels):
                match = [r for r in rows if _label(r) == label and str(r.get("path")) == p]
                if not match:
                    continue
                r = match[0]
                xs.append(i + (k - (len(paths) - 1) / 2) * width)
                ys.append(r["median_s"])
                lo.append(r["median_s"] - (r.get("min_s") or r["median_s"]))
                hi.append((r.get("max_s") or r["median_s"]) - r["median_s"])
            ax.bar(xs, ys, width=width, label=p, yerr=[lo, hi], capsize=2)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("median seconds")
        ax.set_title(name)
        ax.legend(fontsize=8)
    fig.suptitle(title or _title(records), fontsize=10)
    # Leave the top strip to the title (about 0.4 inch whatever the number of panels).
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110), overwrite=overwrite)
    finally:
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hiflow_fast.bench.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a results JSON (a list of records, or bench/gpu_check's gpu_check.json)")
    parser.add_argument("output", type=Path, help="the PNG to write")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        if not args.results.is_file():
            raise HiFlowInputError("results", str(args.results), "an existing JSON file")
        try:
            records = json.loads(args.results.read_text())
        except json.JSONDecodeError as exc:
            raise HiFlowInputError("results", str(args.results), f"a JSON list of records ({exc})") from None
        if isinstance(records, dict) and isinstance(records.get("records"), list):
            records = records["records"]  # bench/gpu_check's merged gpu_check.json
        if not isinstance(records, list):
            raise HiFlowInputError("results", str(args.results), "a JSON list of records (or gpu_check.json)")
        plot_records(records, args.output, overwrite=args.overwrite)
    except HiFlowInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
