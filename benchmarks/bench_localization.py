"""Localization and evaluation: MMSD proposals + NMS, then detection mAP at 7 tIoUs.

Workload (benchmarks/workloads.py): THUMOS14-sized, 212 videos (mean length
about 340 snippets, the longest 2600), 20 classes, 1 to 3 labelled classes per
video, about 66k proposals before NMS, about 1.9k ground-truth instances.

Passes (all forward):
- ``proposals``: ``mmsd_ext.localize.mmsd_proposals(cas, video_scores, lengths)``
  with MMSD's defaults (20 thresholds, class threshold 0.2, NMS 0.4);
- ``map``: ``mmsd_ext.evaluate.detection_map(predictions, ground_truth)`` at
  tIoU 0.1 .. 0.7 (ActivityNet semantics), on the anchor's proposals;
- ``pipeline``: both, proposals feeding the mAP;
- ``mmsd_protocol``: MMSD's whole evaluation, ``mmsd_detection_map`` (proposals,
  then getLocMAP's THUMOS14 protocol: ground truth in seconds, ambiguous
  segments filtered, mAP at the 7 tIoUs).

Anchor ``python_loops``: the same protocols written as plain Python loops over
videos, classes, thresholds and segments (MMSD's getActLoc / getLocMAP
structure), from ``tests/localization_reference.py``: ``mmsd_proposals_loops``,
``detection_map_loops`` and ``mmsd_localization_map_loops``, called with the
same arguments as the public functions (numpy arrays). It is imported from the
source tree when this runs; if it is not there, the anchor is skipped with a
message.

The check compares the mAP values of pipeline and mmsd_protocol (the issue
asks for agreement to 1e-9) and the proposal rows.

Least traffic (bytes): proposals read cas, video scores and lengths
(V*T*C*4 + V*C*4 + V*8) and write P rows of 5 float32 values; map reads the
P predictions and the G ground-truth rows (4 float64 values); the pipeline
reads cas, scores, lengths and ground truth. The mAP tables written are left
out (a few hundred bytes).
"""

import importlib
import importlib.util
import os
import sys

import numpy as np
import torch

from . import workloads
from .harness import Case, Provider

OP = "localization"
TIOUS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
MAP_TOLERANCE = 1e-9  # the localization issue's exactness goal

PRESETS = {
    "tiny": [("videos", 6, 120)],
    "quick": [("videos", workloads.THUMOS_VIDEOS, workloads.THUMOS_MAX_LEN)],
    "full": [("videos", workloads.THUMOS_VIDEOS, workloads.THUMOS_MAX_LEN)],
}

_REFERENCE_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "localization_reference.py")


def parse(token):
    t = token.lower()
    if t in ("thumos", "thumos-localization"):
        return PRESETS["full"][0]
    if t.startswith("videos="):
        return ("videos", int(t.split("=", 1)[1]), workloads.THUMOS_MAX_LEN)
    return None


def public_functions():
    """(mmsd_proposals, detection_map, mmsd_detection_map or None) from mmsd_ext, or (None, reason)."""
    try:
        localize = importlib.import_module("mmsd_ext.localize")
        evaluate = importlib.import_module("mmsd_ext.evaluate")
        return (localize.mmsd_proposals, evaluate.detection_map, getattr(evaluate, "mmsd_detection_map", None)), None
    except (ImportError, AttributeError) as exc:
        return None, f"mmsd_ext.localize / mmsd_ext.evaluate are not available here ({exc})"


def loop_functions():
    """(mmsd_proposals_loops, detection_map_loops, mmsd_localization_map_loops or None)
    from tests/localization_reference.py, or (None, reason)."""
    if not os.path.exists(_REFERENCE_FILE):
        return None, f"{os.path.relpath(_REFERENCE_FILE)} is missing: the Python-loop anchor cannot run"
    try:
        spec = importlib.util.spec_from_file_location("_mmsd_localization_reference", _REFERENCE_FILE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        protocol = getattr(module, "mmsd_localization_map_loops", None)
        return (module.mmsd_proposals_loops, module.detection_map_loops, protocol), None
    except Exception as exc:  # noqa: BLE001 - any failure of that file means no anchor, said plainly
        return None, f"{os.path.relpath(_REFERENCE_FILE)} could not be loaded: {type(exc).__name__}: {exc}"


def cases(ctx, notes=None):
    public, why_public = public_functions()
    loops, why_loops = loop_functions()
    for why in (why_public, why_loops):
        if why and notes is not None:
            notes.append(f"localization: {why}")
    if public is None and loops is None:
        return []
    return [_case(ctx, spec, public, loops) for spec in ctx.sizes(PRESETS, parse)]


def _case(ctx, spec, public, loops):
    _, videos, max_len = spec
    device = ctx.device
    rng = np.random.RandomState(ctx.seed)
    cas, video_scores, lengths, gt = workloads.thumos_localization(rng, videos=videos, max_len=max_len)
    thumos = workloads.thumos14_annotations(gt, len(lengths), cas.shape[2])
    V, T, C = cas.shape
    cached = {}

    def anchor_predictions():
        # The map pass of every provider scores the same predictions: the anchor's
        # when it runs, else the public function's.
        if "preds" not in cached:
            if loops is not None:
                cached["preds"] = _rows(loops[0](cas, video_scores, lengths))
            else:
                cached["preds"] = _rows(public[0](torch.from_numpy(cas), torch.from_numpy(video_scores), torch.from_numpy(lengths)))
        return cached["preds"]

    providers = []
    if public is not None:
        # One provider: the functions pick their NMS backend themselves (auto).
        providers.append(_public_provider(public, cas, video_scores, lengths, gt, thumos, device, anchor_predictions))
    if loops is not None:
        providers.append(_loops_provider(loops, cas, video_scores, lengths, gt, thumos, anchor_predictions))

    def least(expected):
        P = len(expected[0])
        G = len(gt)
        cas_bytes = V * T * C * 4 + V * C * 4 + V * 8
        gt_bytes = G * 4 * 8
        return {"proposals": cas_bytes + P * 5 * 4, "map": P * 5 * 4 + gt_bytes, "pipeline": cas_bytes + gt_bytes, "mmsd_protocol": cas_bytes + gt_bytes}

    return Case(
        op=OP,
        shape=f"V={V} T<={T} C={C} GT={len(gt)}",
        dtype="float32",
        passes=("proposals", "map", "pipeline", "mmsd_protocol"),
        least_bytes=least,
        providers=providers,
        roles={"eager": "python_loops"},
        compare=_compare,
    )


def _public_provider(public, cas, video_scores, lengths, gt, thumos, device, anchor_predictions):
    proposals_fn, map_fn, protocol_fn = public

    def build():
        cas_t = torch.from_numpy(cas).to(device)
        vs_t = torch.from_numpy(video_scores).to(device)
        len_t = torch.from_numpy(lengths).to(device)
        gt_t = torch.from_numpy(gt)
        preds_t = torch.from_numpy(anchor_predictions()).to(torch.float32)

        def proposals():
            return proposals_fn(cas_t, vs_t, len_t)

        def mean_ap():
            return map_fn(preds_t, gt_t, TIOUS)

        def pipeline():
            p = proposals_fn(cas_t, vs_t, len_t)
            return p, map_fn(p, gt_t, TIOUS)

        passes = {"proposals": proposals, "map": mean_ap, "pipeline": pipeline}
        if protocol_fn is not None:
            passes["mmsd_protocol"] = lambda: _call_protocol(protocol_fn, cas_t, vs_t, len_t, thumos)

        def result():
            p, m = pipeline()
            return _rows(p), _map_values(m), _protocol_result(passes)

        # No result_pass: result() also runs the MMSD protocol, so it is no pipeline sample.
        return {"passes": passes, "result": result}

    return Provider("mmsd_ext", "mmsd_ext", build, device=device)


def _loops_provider(loops, cas, video_scores, lengths, gt, thumos, anchor_predictions):
    proposals_fn, map_fn, protocol_fn = loops

    def build():
        preds = anchor_predictions()

        def pipeline():
            p = proposals_fn(cas, video_scores, lengths)
            return p, map_fn(_rows(p), gt, TIOUS)

        passes = {
            "proposals": lambda: proposals_fn(cas, video_scores, lengths),
            "map": lambda: map_fn(preds, gt, TIOUS),
            "pipeline": pipeline,
        }
        if protocol_fn is not None:
            passes["mmsd_protocol"] = lambda: _call_protocol(protocol_fn, cas, video_scores, lengths, thumos)

        def result():
            p, m = pipeline()
            return _rows(p), _map_values(m), _protocol_result(passes)

        # No result_pass: result() also runs the MMSD protocol, so it is no pipeline sample.
        return {"passes": passes, "result": result}

    return Provider("python_loops", "anchor", build, device="cpu")


def _call_protocol(fn, cas, video_scores, lengths, thumos):
    names, segments, labels, classes, ambiguous = thumos
    return fn(cas, video_scores, names, segments, labels, classes, lengths=lengths, ambiguous=ambiguous, tiou_thresholds=TIOUS)


def _protocol_result(passes):
    """The MMSD protocol's mAP, or None (and the pass dropped) if that function cannot run here."""
    if "mmsd_protocol" not in passes:
        return None
    try:
        return _map_values(passes["mmsd_protocol"]())
    except Exception as exc:  # noqa: BLE001 - the other passes still measure
        print(f"localization: mmsd_protocol left out: {type(exc).__name__}: {exc}", file=sys.stderr)
        del passes["mmsd_protocol"]
        return None


def _rows(proposals):
    """Proposal rows (video, class, start, end, score) as a float64 numpy array [P, 5]."""
    if isinstance(proposals, torch.Tensor):
        return proposals.detach().cpu().to(torch.float64).numpy().reshape(-1, 5)
    return np.asarray(proposals, dtype=np.float64).reshape(-1, 5)


def _map_values(result):
    """The mAP per tIoU from a result object (``.map``), a dict, the loops'
    (classes, ap, map, average) tuple, or a plain sequence."""
    value = getattr(result, "map", None)
    if value is None and isinstance(result, dict):
        value = result.get("map")
    if value is None and isinstance(result, tuple) and len(result) == 4:
        value = result[2]
    if value is None:
        value = result
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().to(torch.float64).numpy()
    return np.asarray(value, dtype=np.float64).reshape(-1)


def _sorted_rows(rows):
    if len(rows) == 0:
        return rows
    order = np.lexsort((rows[:, 4], rows[:, 3], rows[:, 2], rows[:, 1], rows[:, 0]))
    return rows[order]


def _compare(expected, got):
    e_rows, e_map, e_protocol = expected
    g_rows, g_map, g_protocol = got
    notes = []
    for what, e, g in (("mAP", e_map, g_map), ("MMSD protocol mAP", e_protocol, g_protocol)):
        if e is None or g is None:
            continue
        if e.shape != g.shape:
            return f"differs: {len(g)} {what} values, expected {len(e)}"
        err = float(np.max(np.abs(e - g))) if len(e) else 0.0
        if not err <= MAP_TOLERANCE:
            notes.append(f"{what} by {err:.2g}")
    if len(e_rows) != len(g_rows):
        notes.append(f"{len(g_rows)} proposals, expected {len(e_rows)}")
    else:
        e_s, g_s = _sorted_rows(e_rows), _sorted_rows(g_rows)
        if len(e_s) and not np.allclose(e_s, g_s, rtol=1e-5, atol=1e-6):
            notes.append("proposal rows differ")
    return "ok" if not notes else "differs: " + "; ".join(notes)
