"""Turn the benchmark suite's pytest-benchmark JSON into a markdown report and PNG plots.

    python benchmarks/report.py RESULTS.json [MORE.json ...] [--out benchmarks/results] [--name NAME]

Writes ``<out>/<name>.md``, ``<out>/<name>.png`` (lookup forward: time vs K) and one
``<out>/<name>-<op>-<pass>.png`` per other timed operation, and keeps the JSON beside them (several
inputs, e.g. a GPU run split into chunks, are merged into ``<name>.json``).

Every number in the report comes from the JSON; the only constants are the devices' datasheet
peaks below, used for the roofline columns.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import sys
from collections import defaultdict
from pathlib import Path

# Datasheet peaks (dense, no sparsity): HBM bandwidth in bytes/s, and FLOP/s per precision. "ieee"
# is plain FP32 on the CUDA cores. The first entry whose key occurs in the device name wins;
# a None entry marks a known variant whose peaks differ and are not tabulated.
DEVICE_PEAKS = (
    ("H100 PCIe", {"bandwidth": 2.0e12, "tf32": 378e12, "bf16": 756e12, "fp16": 756e12, "ieee": 51e12}),
    ("H100 NVL", None),
    ("H200 NVL", None),
    # torch reports the SXM part as "NVIDIA H100 80GB HBM3".
    ("H100 80GB HBM3", {"bandwidth": 3.35e12, "tf32": 494e12, "bf16": 989e12, "fp16": 989e12, "ieee": 67e12}),
    ("H100 SXM", {"bandwidth": 3.35e12, "tf32": 494e12, "bf16": 989e12, "fp16": 989e12, "ieee": 67e12}),
    ("H200", {"bandwidth": 4.8e12, "tf32": 494e12, "bf16": 989e12, "fp16": 989e12, "ieee": 67e12}),
)

# The baseline each op's speed-ups are taken over (the naive PyTorch way of doing the same job).
NAIVE_METHOD = {"enqueue": "index_copy"}
METHOD_ORDER = ("naive", "index_copy", "faiss", "nnclr_fast")
PRECISION_ORDER = ("tf32", "bf16", "fp16", "ieee")
OP_ORDER = ("lookup", "top5", "enqueue", "train_step")
SEARCH_OPS = ("lookup", "top5")

STYLE = {
    "naive": ("tab:gray", "o"),
    "index_copy": ("tab:gray", "o"),
    "faiss": ("tab:orange", "s"),
    "nnclr_fast": ("tab:blue", "^"),
}


def device_peaks(device: str | None):
    for key, peaks in DEVICE_PEAKS:
        if device and key in device:
            return peaks
    return None


# --------------------------------------------------------------------------------------------
# Loading


def load(paths):
    """(records, runs): one flat dict per benchmark, and per input file its run metadata."""
    records, runs = [], []
    for path in paths:
        data = json.loads(Path(path).read_text())
        runs.append(
            {
                "path": str(path),
                "machine_info": data.get("machine_info", {}),
                "commit_info": data.get("commit_info", {}),
                "datetime": data.get("datetime"),
                "pytest_benchmark": data.get("version"),
                "suite": data.get("nnclr_bench", {}),
            }
        )
        for bench in data.get("benchmarks", []):
            info = bench.get("extra_info", {})
            if "op" not in info:
                continue
            # A GPU run's figures are CUDA-event times per call; pytest-benchmark's own stats
            # there are host-clock times of whole rounds (N calls and a synchronisation).
            device_timing = info.get("device_timing")
            if device_timing:
                figures = {k: device_timing[k] for k in ("median_s", "iqr_s", "min_s")}
                figures["timed_rounds"] = device_timing["rounds"]
                figures["timing"] = f"{device_timing['method']}, {device_timing['calls_per_round']} calls per round"
            else:
                stats = bench["stats"]
                figures = {"median_s": stats["median"], "iqr_s": stats.get("iqr"), "min_s": stats["min"],
                           "timed_rounds": stats["rounds"], "timing": "host clock, 1 call per round"}
            records.append({"pass": "", **info, "name": bench["name"], **figures})
    return records, runs


def _case_key(rec):
    return (rec["op"], rec["pass"], rec.get("B"), rec.get("K"), rec.get("D"), rec.get("dtype"), rec.get("precision"))


def analyse(records):
    """Adds speed-ups at equal precision and roofline fractions to every record."""
    by_case = {(_case_key(r), r["method"]): r for r in records}
    for rec in records:
        naive = by_case.get((_case_key(rec), NAIVE_METHOD.get(rec["op"], "naive")))
        faiss = by_case.get((_case_key(rec), "faiss"))
        rec["vs_naive"] = naive["median_s"] / rec["median_s"] if naive and naive is not rec else None
        rec["vs_faiss"] = faiss["median_s"] / rec["median_s"] if faiss and faiss is not rec else None
        rec["roof_bw"] = rec["roof_flops"] = None
        peaks = device_peaks(rec.get("device"))
        if peaks and rec["op"] in SEARCH_OPS and rec.get("precision") in peaks:
            # Share of the time the device would need at its peak: reading the queue once from
            # HBM, and doing 2*B*K*D FLOPs at the precision's tensor-core (or FP32) peak.
            rec["roof_bw"] = rec["queue_bytes"] / peaks["bandwidth"] / rec["median_s"]
            rec["roof_flops"] = rec["flops"] / peaks[rec["precision"]] / rec["median_s"]
    return records


def _order(rec):
    return (
        OP_ORDER.index(rec["op"]) if rec["op"] in OP_ORDER else len(OP_ORDER),
        rec["op"],
        rec["pass"] != "forward",
        rec["pass"],
        rec.get("dtype") or "",
        rec.get("D") or 0,
        rec.get("B") or 0,
        rec.get("K") or 0,
        PRECISION_ORDER.index(rec["precision"]) if rec.get("precision") in PRECISION_ORDER else 9,
        METHOD_ORDER.index(rec["method"]) if rec["method"] in METHOD_ORDER else 9,
    )


# --------------------------------------------------------------------------------------------
# Markdown


def _ms(seconds):
    if seconds is None:
        return "n/a"
    ms = seconds * 1e3
    # Three significant digits, never in exponent notation.
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"


def _x(ratio):
    return "—" if ratio is None else f"{ratio:.2f}×"


def _pct(fraction):
    return "n/a" if fraction is None else f"{100 * fraction:.1f}%"


def _mib(nbytes):
    return "n/a" if nbytes is None else f"{nbytes / 2**20:.1f}"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _geomean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _ratio_cell(values):
    if not values:
        return "—"
    return f"{_x(_geomean(values))} ({_x(min(values))} to {_x(max(values))}, {len(values)} sizes)"


def _summary_rows(groups):
    rows = []
    for key, cols in sorted(groups.items(), key=lambda kv: tuple(str(k) for k in kv[0])):
        rows.append([*key, _ratio_cell(cols["naive"]), _ratio_cell(cols["faiss"])])
    return rows


def _default_ratios(records):
    """Speed-ups of nnclr_fast over each baseline when every method runs at its own default."""
    defaults = {}
    for rec in records:
        if rec.get("is_default") and rec["op"] != "train_step":
            shape = (rec["op"], rec["pass"], rec.get("B"), rec.get("K"), rec.get("D"), rec.get("dtype"))
            defaults[(shape, rec["method"])] = rec
    groups = defaultdict(lambda: {"naive": [], "faiss": []})
    for (shape, method), rec in defaults.items():
        if method != "nnclr_fast":
            continue
        op, pass_, _, _, _, dtype = shape
        for col, baseline in (("naive", NAIVE_METHOD.get(op, "naive")), ("faiss", "faiss")):
            base = defaults.get((shape, baseline))
            if base is not None:
                groups[(op, pass_, dtype)][col].append(base["median_s"] / rec["median_s"])
    return groups


def summary_lines(records):
    groups = defaultdict(lambda: {"naive": [], "faiss": []})
    for rec in records:
        if rec["method"] != "nnclr_fast" or rec["op"] == "train_step":
            continue
        key = (rec["op"], rec["pass"], rec.get("dtype"), rec.get("precision"))
        for col in ("naive", "faiss"):
            if rec[f"vs_{col}"] is not None:
                groups[key][col].append(rec[f"vs_{col}"])
    if not groups:
        return []
    lines = [
        "## Summary: nnclr_fast speed-up at equal precision",
        "",
        "Geometric mean over the measured sizes (range and count in brackets).",
        "",
        *_table(["op", "pass", "queue dtype", "precision", "over naive PyTorch", "over FAISS"], _summary_rows(groups)),
        "",
    ]
    defaults = _default_ratios(records)
    # Only informative when some method was also run away from its default.
    if defaults and not all(rec.get("is_default") for rec in records):
        lines += [
            "Out of the box, each method at its own default precision (see the *default* column):",
            "",
            *_table(["op", "pass", "queue dtype", "over naive PyTorch", "over FAISS"], _summary_rows(defaults)),
            "",
        ]
    return lines


# Issue 15 item 4's CPU targets at the headline shape: nnclr_fast with a bfloat16 queue against
# faiss-cpu (float32, its only precision), and nnclr_fast with a float32 queue against it.
CPU_TARGETS = (("bfloat16", "bf16", 2.0), ("float32", "ieee", 1.0))
HEADLINE_SHAPE = {"B": 512, "K": 98304, "D": 256}


def cpu_target_lines(records):
    """nnclr_fast at the headline shape over faiss-cpu's float32 search, measured in one run."""
    rows = []
    for rec in records:
        if rec.get("device") != "CPU" or rec["method"] != "faiss" or rec["op"] not in SEARCH_OPS:
            continue
        if rec.get("dtype") != "float32" or any(rec.get(k) != v for k, v in HEADLINE_SHAPE.items()):
            continue
        for dtype, precision, target in CPU_TARGETS:
            mine = next((r for r in records if r["method"] == "nnclr_fast" and r["device"] == "CPU"
                         and (r["op"], r["pass"], r.get("dtype"), r.get("precision")) == (rec["op"], rec["pass"], dtype, precision)
                         and all(r.get(k) == v for k, v in HEADLINE_SHAPE.items())), None)
            if mine is None:
                continue
            ratio = rec["median_s"] / mine["median_s"]
            rows.append([rec["op"], rec["pass"], f"{dtype} ({precision})", _ms(mine["median_s"]), _ms(rec["median_s"]),
                         _x(ratio), f"≥ {target:.1f}×", "met" if ratio >= target else "**not met**"])
    if not rows:
        return []
    return [
        "## CPU targets: nnclr_fast vs faiss-cpu at B=512, D=256, K=98,304",
        "",
        "FAISS searches float32 only, so nnclr_fast's bfloat16 queue is compared with FAISS's float32 "
        "search of the same rows, both measured in this run (medians).",
        "",
        *_table(["op", "pass", "nnclr_fast queue", "nnclr_fast ms", "faiss-cpu float32 ms", "speed-up", "target", "result"], rows),
        "",
    ]


def search_table(recs):
    header = [
        "B", "K", "D", "queue", "method", "precision", "default", "median ms", "min ms", "IQR ms",
        "vs naive", "vs FAISS", "extra MiB", "top-1/top-k agreement", "HBM roofline", "FLOP roofline", "timed as",
    ]  # fmt: skip
    rows = []
    for r in recs:
        extra = _mib(r.get("peak_extra_bytes"))
        if r.get("faiss_reserved_bytes"):
            extra += f" (+{_mib(r['faiss_reserved_bytes'])} pool)"
        agree = r.get("agreement_with_ieee")
        rows.append(
            [
                r["B"], r["K"], r["D"], r["dtype"], r["method"], r["precision"], "yes" if r.get("is_default") else "",
                _ms(r["median_s"]), _ms(r["min_s"]), _ms(r.get("iqr_s")), _x(r["vs_naive"]), _x(r["vs_faiss"]), extra,
                "—" if agree is None else f"{agree:.4f}", _pct(r["roof_bw"]), _pct(r["roof_flops"]), r["timing"],
            ]  # fmt: skip
        )
    return _table(header, rows)


def enqueue_table(recs):
    header = ["B", "K", "D", "queue", "method", "median ms", "min ms", "IQR ms", "vs index_copy", "extra MiB"]
    rows = [
        [r["B"], r["K"], r["D"], r["dtype"], r["method"], _ms(r["median_s"]), _ms(r["min_s"]), _ms(r.get("iqr_s")), _x(r["vs_naive"]),
         _mib(r.get("peak_extra_bytes"))]  # fmt: skip
        for r in recs
    ]
    return _table(header, rows)


def train_step_table(recs):
    header = ["method", "precision", "step median ms", "IQR ms", "step speed-up vs naive", "lookup ms per call (isolated)",
              "lookups per step", "lookup share of step", "extra MiB"]  # fmt: skip
    rows = [
        [r["method"], r["precision"], _ms(r["median_s"]), _ms(r.get("iqr_s")), _x(r["vs_naive"]),
         _ms(r["lookup_ms"] / 1e3 if "lookup_ms" in r else None), r.get("lookups_per_step", "n/a"),
         _pct(r.get("lookup_share")), _mib(r.get("peak_extra_bytes"))]  # fmt: skip
        for r in recs
    ]
    lines = _table(header, rows)
    if recs:
        r = recs[0]
        lines += ["", f"Step: {r.get('setup', '')}"]
    return lines


def header_lines(records, runs, report_command):
    devices = sorted({r.get("device", "?") for r in records})
    lines = [f"# nnclr_fast benchmarks on {', '.join(devices) or 'no device'}", ""]
    if any(d == "CPU" for d in devices):
        lines += [
            "**CPU figures.** These are measured on the CPU (nnclr_fast's chunked PyTorch path, faiss-cpu); "
            "they show that the suite runs, not how the fused GPU kernel performs.",
            "",
        ]
    for run in runs:
        suite = run["suite"]
        env = suite.get("environment", {})
        mi, ci = run["machine_info"], run["commit_info"]
        cpu = mi.get("cpu", {})
        lines += [
            f"- Results: `{Path(run['path']).name}`, {run['datetime']}",
            f"- Command: `{suite.get('command', 'not recorded')}` (grid: {suite.get('grid', '?')})",
            f"- Device: {env.get('device', '?')}"
            + (f", compute capability {env['compute_capability']}, {env['sm_count']} SMs" if env.get("sm_count") else "")
            + f"; CPU: {cpu.get('brand_raw', '?')}, {cpu.get('count', '?')} cores, torch threads {env.get('torch_threads', '?')}"
            + (f", load average {env['load_average_1min']:.2f} when the run started" if "load_average_1min" in env else ""),
            f"- Versions: python {env.get('python', mi.get('python_version'))}, torch {env.get('torch')} (CUDA {env.get('cuda')}), "
            f"triton {env.get('triton')}, faiss {env.get('faiss') or 'not installed'}, numpy {env.get('numpy')}, "
            f"nnclr_fast {env.get('nnclr_fast')}, pytest-benchmark {run['pytest_benchmark']}",
            f"- Commit: {ci.get('id', '?')}{' (uncommitted changes)' if ci.get('dirty') else ''} on {ci.get('branch', '?')}",
        ]
    lines += [
        f"- Report: `{report_command}`",
        "",
        "Times are medians per call over the timed rounds, after warm-up calls (Triton compilation included). "
        "On a GPU a round is N calls (at least 2 ms in all), replayed from a captured CUDA graph where the "
        "method allows it (FAISS, the enqueue and the training step run eagerly), timed with CUDA events, "
        "each call reading the next of several queue copies that together exceed twice the last-level cache "
        "(so the queue comes from device memory); *timed as* says which. On the CPU a round is one call "
        "on the host clock. "
        "*extra MiB*: peak of `torch.cuda.max_memory_allocated()` above what was live before one untimed "
        "call (outputs included); FAISS also keeps its own temporary pool outside torch's allocator, "
        "measured once at device level and shown as *+pool*. *agreement*: share of queries whose top-1 "
        "(lookup) or share of the exact top-k (top-k) matches an exact float32 search. "
        "*HBM roofline*: time to read the queue once at peak bandwidth / measured time (the rotating "
        "queue copies keep the queue out of L2); *FLOP roofline*: 2·B·K·D at the precision's peak / measured time. "
        "Speed-ups compare methods at the same precision only; *default* marks each method's own default.",
        "",
    ]
    return lines


def skipped_lines(runs):
    reasons = defaultdict(list)
    for run in runs:
        for item in run["suite"].get("skipped", []):
            reasons[item["reason"]].append(item["test"])
    if not reasons:
        return []
    lines = ["## Not run", ""]
    for reason, tests in sorted(reasons.items()):
        lines.append(f"- {reason} ({len(tests)} benchmarks, e.g. `{tests[0]}`)")
    return lines + [""]


def render_markdown(records, runs, report_command, images):
    lines = header_lines(records, runs, report_command)
    lines += summary_lines(records)
    lines += cpu_target_lines(records)
    sections = defaultdict(list)
    for rec in sorted(records, key=_order):
        sections[(rec["op"], rec["pass"])].append(rec)
    for (op, pass_), recs in sections.items():
        lines += [f"## {op}, {pass_}", ""]
        if (op, pass_) in images:
            lines += [f"![{op} {pass_}]({images[(op, pass_)]})", ""]
        if op in SEARCH_OPS:
            lines += search_table(recs)
        elif op == "enqueue":
            lines += enqueue_table(recs)
        elif op == "train_step":
            lines += train_step_table(recs)
        lines.append("")
    lines += skipped_lines(runs)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Plots


def plot(recs, title, path) -> bool:
    """Time vs K, one panel per (B, D, queue dtype), one line per method and precision."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("matplotlib is not installed: no plot written", file=sys.stderr)
        return False
    panels = defaultdict(lambda: defaultdict(list))
    for r in recs:
        panels[(r["dtype"], r["D"], r["B"])][(r["method"], r["precision"])].append((r["K"], r["median_s"] * 1e3))
    if not any(len(pts) > 1 for lines in panels.values() for pts in lines.values()):
        return False
    keys = sorted(panels)
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(5.2 * ncols, 3.9 * nrows + 1.0), squeeze=False, layout="constrained"
    )
    handles = {}
    for ax, key in zip(axes.flat, keys):
        dtype, dim, batch = key
        lines = panels[key]
        for method, precision in sorted(lines, key=lambda mp: (_order_index(METHOD_ORDER, mp[0]), mp[1])):
            pts = sorted(lines[(method, precision)])
            color, marker = STYLE.get(method, ("tab:green", "x"))
            (h,) = ax.plot(
                [k for k, _ in pts],
                [t for _, t in pts],
                color=color,
                marker=marker,
                linestyle="--" if precision == "ieee" else "-",
                label=method if precision == "n/a" else f"{method} ({precision})",
            )
            handles[h.get_label()] = h
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ks = sorted({k for pts in lines.values() for k, _ in pts})
        ax.set_xticks(ks, [f"{k // 1024}k" for k in ks])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        # Plain numbers (0.2, 30, 200) rather than powers of ten; a range under a decade has at
        # most one major tick, so its minor ticks get labels too.
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        times = [t for pts in lines.values() for _, t in pts]
        if max(times) < 10 * min(times):
            ax.yaxis.set_minor_formatter(plain)
        ax.set_title(f"B={batch}, D={dim}, queue {dtype}")
        ax.set_xlabel("queue size K")
        ax.set_ylabel("median time (ms)")
        ax.grid(True, which="major", alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.suptitle(title)
    labels = sorted(handles, key=lambda label: [_order_index(METHOD_ORDER + PRECISION_ORDER, w.strip("()")) for w in label.split()])
    fig.legend([handles[k] for k in labels], labels, loc="outside lower center", ncol=min(4, len(labels)), frameon=False)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _order_index(order, value):
    return order.index(value) if value in order else len(order)


def write_plots(records, out: Path, name: str):
    """{(op, pass): image file name} for every op timed at more than one K."""
    sections = defaultdict(list)
    for rec in records:
        if rec.get("K") is not None and rec["op"] != "train_step":
            sections[(rec["op"], rec["pass"])].append(rec)
    devices = ", ".join(sorted({r.get("device", "?") for r in records}))
    images = {}
    for (op, pass_), recs in sorted(sections.items(), key=lambda kv: (kv[0] != ("lookup", "forward"), kv[0])):
        main = (op, pass_) == ("lookup", "forward")
        fname = f"{name}.png" if main else f"{name}-{op}-{pass_.replace('+', '-')}.png"
        if plot(recs, f"{op} {pass_} on {devices}: median time vs queue size", out / fname):
            images[(op, pass_)] = fname
    return images


# --------------------------------------------------------------------------------------------


def keep_json(paths, out: Path, name: str):
    dest = out / f"{name}.json"
    if len(paths) == 1:
        if Path(paths[0]).resolve() != dest.resolve():
            shutil.copyfile(paths[0], dest)
        return dest
    merged = None
    for path in paths:
        data = json.loads(Path(path).read_text())
        if merged is None:
            merged = {**data, "benchmarks": [], "merged_from": []}
            merged["nnclr_bench"] = {**data.get("nnclr_bench", {}), "commands": [], "skipped": []}
        merged["benchmarks"] += data.get("benchmarks", [])
        merged["merged_from"].append(Path(path).name)
        suite = data.get("nnclr_bench", {})
        merged["nnclr_bench"]["commands"].append(suite.get("command"))
        merged["nnclr_bench"]["skipped"] += suite.get("skipped", [])
    dest.write_text(json.dumps(merged, indent=2))
    return dest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", type=Path, help="pytest-benchmark --benchmark-json output(s)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output folder")
    parser.add_argument("--name", help="base name of the outputs (default: the first JSON's stem)")
    args = parser.parse_args(argv)
    name = args.name or args.json[0].stem
    args.out.mkdir(parents=True, exist_ok=True)

    records, runs = load(args.json)
    if not records:
        print(f"no nnclr_fast benchmark records in {', '.join(map(str, args.json))}", file=sys.stderr)
        return 1
    analyse(records)
    images = write_plots(records, args.out, name)
    command = shlex.join(["python", "benchmarks/report.py", *(argv if argv is not None else sys.argv[1:])])
    (args.out / f"{name}.md").write_text(render_markdown(records, runs, command, images))
    kept = keep_json(args.json, args.out, name)
    print(f"wrote {args.out / (name + '.md')}, {len(images)} plot(s), data in {kept}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
