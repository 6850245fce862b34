"""benchmarks/report.py on small pytest-benchmark JSON files written here (made-up timings that
test the report's arithmetic and output, not any claim about performance)."""

import importlib.util
import json
from pathlib import Path

import pytest

REPORT_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "report.py"
H100 = "NVIDIA H100 80GB HBM3"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("bench_report", REPORT_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench(method, precision, median_s, *, B=256, K=8192, D=128, dtype="float32", device=H100, op="lookup", is_default=True, **extra):
    info = {
        "op": op,
        "pass": "forward",
        "method": method,
        "precision": precision,
        "is_default": is_default,
        "B": B,
        "K": K,
        "D": D,
        "dtype": dtype,
        "queue_bytes": K * D * (4 if dtype == "float32" else 2),
        "flops": 2 * B * K * D,
        "peak_extra_bytes": 3 * 2**20,
        "device": device,
        **extra,
    }
    stats = {"median": median_s, "min": median_s * 0.9, "iqr": median_s * 0.1, "rounds": 50}
    return {"name": f"test_{op}[B{B}-K{K}-D{D}-{dtype}-{precision}-{method}]", "extra_info": info, "stats": stats}


def write_json(path, benchmarks, command="pytest benchmarks/ --benchmark-only", skipped=()):
    data = {
        "machine_info": {"cpu": {"brand_raw": "Test CPU", "count": 2}, "python_version": "3.11.7"},
        "commit_info": {"id": "abc123", "dirty": False, "branch": "main"},
        "datetime": "2026-01-01T00:00:00",
        "version": "5.2.3",
        "benchmarks": benchmarks,
        "nnclr_bench": {
            "command": command,
            "grid": "full",
            "environment": {"device": H100, "torch": "2.15.0", "triton": "3.9.0", "faiss": "1.15.1"},
            "skipped": list(skipped),
        },
    }
    path.write_text(json.dumps(data))
    return path


def by_method(records):
    return {(r["method"], r["precision"]): r for r in records}


def test_speedups_are_taken_at_equal_precision_only(report, tmp_path):
    path = write_json(
        tmp_path / "r.json",
        [
            bench("naive", "tf32", 2e-3),
            bench("nnclr_fast", "tf32", 0.5e-3),
            bench("naive", "ieee", 4e-3),
            bench("faiss", "ieee", 2e-3),
            bench("nnclr_fast", "ieee", 1e-3),
        ],
    )
    records, _ = report.load([path])
    rec = by_method(report.analyse(records))
    assert rec["nnclr_fast", "tf32"]["vs_naive"] == pytest.approx(4.0)
    # FAISS has no TF32 row, so the TF32 row gets no FAISS ratio.
    assert rec["nnclr_fast", "tf32"]["vs_faiss"] is None
    assert rec["nnclr_fast", "ieee"]["vs_naive"] == pytest.approx(4.0)
    assert rec["nnclr_fast", "ieee"]["vs_faiss"] == pytest.approx(2.0)
    assert rec["faiss", "ieee"]["vs_naive"] == pytest.approx(2.0)
    assert rec["naive", "ieee"]["vs_naive"] is None


def test_out_of_the_box_summary_pairs_each_methods_default(report, tmp_path):
    path = write_json(
        tmp_path / "d.json",
        [
            bench("naive", "tf32", 2e-3, is_default=False),
            bench("naive", "ieee", 4e-3),
            bench("faiss", "ieee", 3e-3),
            bench("nnclr_fast", "tf32", 0.5e-3),
            bench("nnclr_fast", "ieee", 1e-3, is_default=False),
        ],
    )
    out = tmp_path / "out"
    assert report.main([str(path), "--out", str(out)]) == 0
    text = (out / "d.md").read_text()
    # nnclr_fast's TF32 default against PyTorch's IEEE default and FAISS's only (IEEE) mode.
    assert "| lookup | forward | float32 | 8.00× (8.00× to 8.00×, 1 sizes) | 6.00× (6.00× to 6.00×, 1 sizes) |" in text


def test_roofline_fractions_use_the_device_table(report, tmp_path):
    path = write_json(tmp_path / "r.json", [bench("nnclr_fast", "tf32", 0.5e-3), bench("nnclr_fast", "ieee", 1e-3)])
    records, _ = report.load([path])
    rec = by_method(report.analyse(records))
    queue_bytes, flops = 8192 * 128 * 4, 2 * 256 * 8192 * 128
    assert rec["nnclr_fast", "tf32"]["roof_bw"] == pytest.approx(queue_bytes / 3.35e12 / 0.5e-3)
    assert rec["nnclr_fast", "tf32"]["roof_flops"] == pytest.approx(flops / 494e12 / 0.5e-3)
    assert rec["nnclr_fast", "ieee"]["roof_flops"] == pytest.approx(flops / 67e12 / 1e-3)


@pytest.mark.parametrize(
    "device, bandwidth",
    [
        ("NVIDIA H100 80GB HBM3", 3.35e12),
        ("NVIDIA H100 PCIe", 2.0e12),
        ("NVIDIA H200", 4.8e12),
        ("NVIDIA H200 NVL", None),
        ("NVIDIA A100-SXM4-80GB", None),
        ("CPU", None),
    ],
)
def test_device_peaks(report, device, bandwidth):
    peaks = report.device_peaks(device)
    assert (peaks["bandwidth"] if peaks else None) == bandwidth


def test_unknown_device_gets_na_roofline(report, tmp_path):
    path = write_json(tmp_path / "cpu.json", [bench("naive", "ieee", 8e-3, device="CPU", peak_extra_bytes=None)])
    out = tmp_path / "out"
    assert report.main([str(path), "--out", str(out)]) == 0
    text = (out / "cpu.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| 256 | 8192"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[-3:] == ["n/a", "n/a", "host clock, 1 call per round"]
    assert "CPU figures" in text


def test_main_writes_markdown_plot_and_keeps_json(report, tmp_path):
    benches = []
    for dtype, precision in (("float32", "tf32"), ("float32", "ieee"), ("bfloat16", "bf16")):
        for K in (8192, 32768, 65536, 98304):
            for method, scale in (("naive", 4.0), ("nnclr_fast", 1.0), ("faiss", 2.0)):
                if method == "faiss" and precision == "tf32":
                    continue
                benches.append(bench(method, precision, scale * K * 1e-8, K=K, dtype=dtype))
    skipped = [{"test": "test_train_step[naive]", "reason": "needs a GPU"}]
    path = write_json(tmp_path / "gpu.json", benches, command="pytest benchmarks/ --benchmark-only -k lookup", skipped=skipped)
    out = tmp_path / "results"
    assert report.main([str(path), "--out", str(out)]) == 0

    text = (out / "gpu.md").read_text()
    assert H100 in text
    assert "`pytest benchmarks/ --benchmark-only -k lookup`" in text
    assert "python benchmarks/report.py" in text
    assert "abc123" in text
    assert "needs a GPU (1 benchmarks, e.g. `test_train_step[naive]`)" in text
    # nnclr_fast is 4x naive and 2x FAISS at every size, so the summary says exactly that.
    assert "| lookup | forward | float32 | ieee | 4.00× (4.00× to 4.00×, 4 sizes) | 2.00× (2.00× to 2.00×, 4 sizes) |" in text
    assert "| lookup | forward | float32 | tf32 | 4.00× (4.00× to 4.00×, 4 sizes) | — |" in text
    assert json.loads((out / "gpu.json").read_text())["benchmarks"] == benches

    pytest.importorskip("matplotlib")
    png = out / "gpu.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![lookup forward](gpu.png)" in text


def test_several_json_files_are_merged(report, tmp_path):
    a = write_json(tmp_path / "a.json", [bench("naive", "ieee", 4e-3)], command="pytest benchmarks/ -k naive")
    b = write_json(tmp_path / "b.json", [bench("nnclr_fast", "ieee", 1e-3)], command="pytest benchmarks/ -k nnclr_fast")
    out = tmp_path / "out"
    assert report.main([str(a), str(b), "--out", str(out), "--name", "h100"]) == 0
    merged = json.loads((out / "h100.json").read_text())
    assert [x["extra_info"]["method"] for x in merged["benchmarks"]] == ["naive", "nnclr_fast"]
    assert merged["nnclr_bench"]["commands"] == ["pytest benchmarks/ -k naive", "pytest benchmarks/ -k nnclr_fast"]
    # The speed-up spans the two files.
    assert "| 256 | 8192 | 128 | float32 | nnclr_fast | ieee | yes | 1 |" in (out / "h100.md").read_text()


def test_train_step_share_is_reported(report, tmp_path):
    steps = [
        bench("naive", "tf32", 0.2, op="train_step", K=98304, D=256, lookup_ms=10.0, lookups_per_step=2, lookup_share=0.1),
        bench("nnclr_fast", "tf32", 0.18, op="train_step", K=98304, D=256, lookup_ms=1.0, lookups_per_step=2, lookup_share=0.011),
    ]
    path = write_json(tmp_path / "step.json", steps)
    out = tmp_path / "out"
    assert report.main([str(path), "--out", str(out)]) == 0
    text = (out / "step.md").read_text()
    assert "| nnclr_fast | tf32 | 180 | 18 | 1.11× | 1 | 2 | 1.1% | 3.0 |" in text


def test_json_without_suite_records_is_an_error(report, tmp_path):
    path = tmp_path / "empty.json"
    path.write_text(json.dumps({"benchmarks": [{"name": "x", "extra_info": {}, "stats": {}}]}))
    assert report.main([str(path), "--out", str(tmp_path / "out")]) == 1


def test_gpu_event_timing_replaces_the_host_clock_stats(report, tmp_path):
    timed = bench("nnclr_fast", "bf16", 5e-3, dtype="bfloat16")  # host clock: a whole round of 40 calls
    timed["extra_info"]["device_timing"] = {
        "median_s": 40e-6, "min_s": 38e-6, "iqr_s": 1e-6, "rounds": 60, "method": "cuda graph", "calls_per_round": 40, "note": "",
    }
    path = write_json(tmp_path / "g.json", [bench("naive", "bf16", 160e-6, dtype="bfloat16"), timed])
    records, _ = report.load([path])
    rec = by_method(report.analyse(records))
    assert rec["nnclr_fast", "bf16"]["median_s"] == 40e-6 and rec["nnclr_fast", "bf16"]["timed_rounds"] == 60
    assert rec["nnclr_fast", "bf16"]["vs_naive"] == pytest.approx(4.0)
    out = tmp_path / "out"
    assert report.main([str(path), "--out", str(out)]) == 0
    assert "| 0.04 | 0.038 | 0.001 | 4.00× |" in (out / "g.md").read_text()
    assert "cuda graph, 40 calls per round |" in (out / "g.md").read_text()


def test_cpu_targets_compare_bf16_and_float32_with_faiss_float32(report, tmp_path):
    headline = dict(B=512, K=98304, D=256, device="CPU", peak_extra_bytes=None)
    benches = [
        bench("faiss", "ieee", 140e-3, dtype="float32", **headline),
        bench("nnclr_fast", "bf16", 64e-3, dtype="bfloat16", **headline),
        bench("nnclr_fast", "ieee", 150e-3, dtype="float32", **headline),
        bench("nnclr_fast", "ieee", 170e-3, dtype="bfloat16", is_default=False, **headline),
        # Another shape: not part of the targets.
        bench("faiss", "ieee", 10e-3, dtype="float32", device="CPU", peak_extra_bytes=None),
    ]
    out = tmp_path / "out"
    assert report.main([str(write_json(tmp_path / "cpu.json", benches)), "--out", str(out)]) == 0
    text = (out / "cpu.md").read_text()
    assert "## CPU targets: nnclr_fast vs faiss-cpu at B=512, D=256, K=98,304" in text
    assert "| lookup | forward | bfloat16 (bf16) | 64 | 140 | 2.19× | ≥ 2.0× | met |" in text
    assert "| lookup | forward | float32 (ieee) | 150 | 140 | 0.93× | ≥ 1.0× | **not met** |" in text


def test_no_cpu_targets_without_the_headline_shape(report, tmp_path):
    benches = [bench("faiss", "ieee", 10e-3, device="CPU", peak_extra_bytes=None), bench("nnclr_fast", "ieee", 8e-3, device="CPU", peak_extra_bytes=None)]
    out = tmp_path / "out"
    assert report.main([str(write_json(tmp_path / "c.json", benches)), "--out", str(out)]) == 0
    assert "CPU targets" not in (out / "c.md").read_text()
