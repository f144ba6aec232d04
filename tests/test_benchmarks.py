"""The benchmark suite runs end to end: a tiny run of the CLI, its CSV, the plot, the checks it makes."""

import csv
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from benchmarks import bench_distill, harness  # noqa: E402

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None

# What issue 7 requires of every CSV row (the suite writes more).
REQUIRED_COLUMNS = {"op", "provider", "shape", "dtype", "device", "pass", "median_ms", "gbps", "speedup_vs_eager", "torch", "commit", "timestamp"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One CLI run: top-k at a tiny size and hard NMS on 64 segments, one thread, few repetitions."""
    out = tmp_path_factory.mktemp("bench")
    csv_path = out / "bench.csv"
    png_path = out / "bench.png"
    cmd = [
        sys.executable, "-m", "benchmarks",
        "--device", "cpu",
        "--ops", "topk_mil_pool", "temporal_nms",
        "--sizes", "2x64x5", "M=64",
        "--threads", "1",
        "--min-run-time", "0.01",
        "--no-progress",
        "--csv", str(csv_path),
    ]  # fmt: skip
    if HAS_MATPLOTLIB:
        cmd += ["--plot", str(png_path)]
    env = dict(os.environ, MMSD_EXT_QUIET="1")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    return proc, rows, csv_path, png_path


def test_csv_has_the_required_columns_and_a_row_per_provider_and_pass(tiny_run):
    _, rows, csv_path, _ = tiny_run
    with open(csv_path, newline="") as f:
        header = next(csv.reader(f))
    assert REQUIRED_COLUMNS <= set(header)
    assert header == harness.COLUMNS
    topk = [r for r in rows if r["op"] == "topk_mil_pool"]
    providers = {r["provider"] for r in topk}
    assert {"torch.topk", "loop", "reference"} <= providers
    for prov in providers:
        assert {r["pass"] for r in topk if r["provider"] == prov} == {"fwd", "bwd", "fwd+bwd"}
    for r in rows:
        assert float(r["median_ms"]) > 0
        assert float(r["gbps"]) > 0
        assert r["device"] == "cpu" and r["torch"] == torch.__version__
        assert r["commit"] and r["timestamp"] and r["device_name"] and r["machine"]


def test_speedups_are_ratios_to_the_anchor_measured_in_the_same_run(tiny_run):
    _, rows, _, _ = tiny_run
    by = {(r["op"], r["provider"], r["pass"]): r for r in rows}
    for pass_name in ("fwd", "bwd", "fwd+bwd"):
        eager = by[("topk_mil_pool", "torch.topk", pass_name)]
        ref = by[("topk_mil_pool", "reference", pass_name)]
        assert float(eager["speedup_vs_eager"]) == pytest.approx(1.0)
        expected = float(eager["median_ms"]) / float(ref["median_ms"])
        assert float(ref["speedup_vs_eager"]) == pytest.approx(expected, rel=1e-4)
        assert ref["eager_anchor"] == "torch.topk"


def test_every_provider_computes_what_the_eager_anchor_computes(tiny_run):
    _, rows, _, _ = tiny_run
    checked = [r for r in rows if r["check"]]
    assert checked, "the anchors' results were compared with nothing"
    assert all(r["check"] == "ok" for r in checked), [(r["op"], r["provider"], r["check"]) for r in checked]


@pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision is the hard-NMS anchor")
def test_nms_is_timed_against_torchvision_and_the_numpy_loop(tiny_run):
    _, rows, _, _ = tiny_run
    nms = {r["provider"]: r for r in rows if r["op"] == "temporal_nms"}
    assert {"torchvision", "numpy_loop", "reference"} <= set(nms)
    assert nms["reference"]["check"] == "ok" and nms["numpy_loop"]["check"] == "ok"


def test_the_run_prints_a_table_and_says_what_it_did_not_measure(tiny_run):
    proc, _, _, _ = tiny_run
    assert "== topk_mil_pool" in proc.stdout and "x eager" in proc.stdout
    assert "copy bandwidth" in proc.stdout


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is an optional extra")
def test_plot_from_the_run_and_from_the_csv(tiny_run, tmp_path):
    _, _, csv_path, png_path = tiny_run
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from benchmarks import plot

    out = tmp_path / "again.png"
    assert plot.main([str(csv_path), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_csv_appends_under_one_header(tmp_path):
    path = tmp_path / "r.csv"
    row = {c: "" for c in harness.COLUMNS}
    row.update(op="x", provider="p", median_ms=1.0)
    harness._append_csv(str(path), [row])
    harness._append_csv(str(path), [row])
    lines = path.read_text().splitlines()
    assert lines[0].split(",") == harness.COLUMNS and len(lines) == 3
    bad = tmp_path / "other.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(SystemExit, match="other columns"):
        harness._check_csv_header(str(bad))


def test_mmsd_distill_least_traffic_is_three_reads_and_three_gradient_writes():
    # The distillation issue's figure: 356 MB at (32, 2304, 201) in float32.
    nbytes = bench_distill.least_bytes("mmsd_distill_loss", (32, 2304, 201), torch.float32)
    assert nbytes["fwd+bwd"] == 6 * 32 * 2304 * 201 * 4
    assert round(nbytes["fwd+bwd"] / 1e6) == 356


def test_the_check_catches_a_wrong_result():
    x = torch.randn(4, 5)
    assert harness.compare_tensors((x, [x]), (x.clone(), [x.clone()]), 1e-4, 1e-5) == "ok"
    assert harness.compare_tensors((x, [x]), (x + 1e-2, [x]), 1e-4, 1e-5).startswith("differs")
    nan = x.clone()
    nan[0, 0] = float("nan")
    assert "NaN" in harness.compare_tensors(x, nan, 1e-4, 1e-5)


def test_bad_options_are_refused_with_the_option_named():
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--ops", "nope", "--list"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--ops" in proc.stderr and "topk_mil_pool" in proc.stderr


def _stand_in_proposals(cas, video_scores, lengths, thresholds=(0.002, 0.006), class_threshold=0.2):
    """Runs of cas > threshold per labelled (video, class): the shape of MMSD's proposals, nothing more."""
    import numpy as np

    cas, video_scores, lengths = (np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x) for x in (cas, video_scores, lengths))
    rows = []
    for v, c in zip(*np.nonzero(video_scores >= class_threshold)):
        x = cas[v, : lengths[v], c]
        for th in thresholds:
            edges = np.diff(np.concatenate([[0], (x > th).astype(np.int8), [0]]))
            for s, e in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)):
                rows.append((v, c, s, e, float(x[s:e].mean())))
    return np.asarray(rows, dtype=np.float64).reshape(-1, 5)


class _MapResult:
    def __init__(self, values):
        self.map = values


def _stand_in_map(predictions, ground_truth, tious):
    """Share of predictions overlapping a ground truth of their video and class by >= t."""
    import numpy as np

    p = np.asarray(predictions.cpu() if isinstance(predictions, torch.Tensor) else predictions, dtype=np.float64)
    g = np.asarray(ground_truth.cpu() if isinstance(ground_truth, torch.Tensor) else ground_truth, dtype=np.float64)
    same = (p[:, None, 0] == g[None, :, 0]) & (p[:, None, 1] == g[None, :, 1])
    inter = np.clip(np.minimum(p[:, None, 3], g[None, :, 3]) - np.maximum(p[:, None, 2], g[None, :, 2]), 0, None)
    union = (p[:, None, 3] - p[:, None, 2]) + (g[None, :, 3] - g[None, :, 2]) - inter
    iou = np.where(same, inter / np.maximum(union, 1e-12), 0.0).max(axis=1, initial=0.0)
    return _MapResult(np.array([float((iou >= t).mean()) if len(iou) else 0.0 for t in tious]))


def test_localization_benchmark_runs_the_public_functions_beside_the_loops(monkeypatch):
    """With stand-ins for mmsd_ext.localize/evaluate and tests/localization_reference.py (written elsewhere)."""
    from benchmarks import bench_localization

    def public_proposals(cas, video_scores, lengths):
        return torch.from_numpy(_stand_in_proposals(cas, video_scores, lengths)).to(torch.float32)

    monkeypatch.setattr(bench_localization, "public_functions", lambda: ((public_proposals, _stand_in_map, None), None))
    monkeypatch.setattr(bench_localization, "loop_functions", lambda: ((_stand_in_proposals, _stand_in_map, None), None))
    ctx = harness.Context(device="cpu", preset="tiny")
    cases = bench_localization.cases(ctx)
    settings = harness.Settings(device="cpu", min_run_time=0.01, slow_s=0.05, slow_budget_s=0.2, progress=False)
    rows = harness.Runner(settings).run(cases)
    got = {(r["provider"], r["pass"]): r for r in rows}
    assert set(got) == {(p, x) for p in ("mmsd_ext", "python_loops") for x in ("proposals", "map", "pipeline")}
    assert all(r["check"] in ("", "ok") for r in rows), [r["check"] for r in rows]
    assert got[("mmsd_ext", "pipeline")]["check"] == "ok"
    assert got[("python_loops", "pipeline")]["speedup_vs_eager"] == pytest.approx(1.0)
