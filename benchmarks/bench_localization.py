"""Localization and evaluation: MMSD proposals + NMS, then detection mAP at 7 tIoUs.

Workloads (benchmarks/workloads.py):
- THUMOS14-sized (``thumos``, every preset but tiny): 212 videos (mean length
  about 340 snippets, the longest 2600), 20 classes, 1 to 3 labelled classes
  per video, about 66k proposals before NMS, about 1.9k ground-truth instances.
- ActivityNet-like (``activitynet``, the full preset only): 500 videos, a
  tenth of ActivityNet 1.3's 4926 validation videos (the whole set's padded
  [V, T, C] float32 scores would take 3 GB and its Python loops minutes), 200
  classes, lengths up to 750 snippets (mean about 190), one or two labelled
  classes per video with long instances.

Passes (all forward):
- ``proposals``: ``mmsd_ext.localize.mmsd_proposals(cas, video_scores, lengths,
  backend=...)`` with MMSD's defaults (20 thresholds, class threshold 0.2, NMS 0.4);
- ``map``: ``mmsd_ext.evaluate.detection_map(predictions, ground_truth)`` at
  tIoU 0.1 .. 0.7 (ActivityNet semantics), on the anchor's proposals. It has
  no backends, so it is timed once, on the row of the first compiled backend
  (``cpu`` on the CPU, ``cuda`` on a GPU; ``reference`` if none), with the
  predictions on that row's device; not in ``--quick``;
- ``pipeline``: both, proposals feeding the mAP (on a GPU the proposals are
  CUDA tensors; detection_map copies them to the host);
- ``mmsd_protocol``: MMSD's whole evaluation, ``mmsd_detection_map`` (proposals,
  then getLocMAP's THUMOS14 protocol: ground truth in seconds, ambiguous
  segments filtered, mAP at the 7 tIoUs); THUMOS only.

Providers: one per ``mmsd_proposals`` backend usable on the device
(``reference`` and ``cpu`` on the CPU; ``reference``, ``cuda`` and ``triton``
on a GPU, ``reference`` left out of ``--quick`` there), each on that device's tensors.

Anchor ``python_loops``: the same protocols written as plain Python loops over
videos, classes, thresholds and segments (MMSD's getActLoc / getLocMAP
structure), from ``tests/localization_reference.py``: ``mmsd_proposals_loops``,
``detection_map_loops`` and ``mmsd_localization_map_loops``, called with the
same arguments as the public functions (numpy arrays). It is imported from the
source tree when this runs; if it is not there, the anchor is skipped with a
message.

The check compares with the anchor: the mAP values of pipeline and
mmsd_protocol to 1e-9 (the issue's exactness goal), and the proposal rows,
which must be as many, in the same order, and equal to 1e-12 (video, class,
start and end are integers, so those exactly).

Least traffic (bytes): proposals read cas, video scores and lengths
(V*T*C*4 + V*C*4 + V*8) and write P rows of 5 float64 values (P*40); map
reads the P predictions (P*40) and the G ground-truth rows (4 float64 values,
G*32); the pipeline and the protocol read cas, scores, lengths and ground
truth. The mAP tables written are left out (a few hundred bytes).
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
ROW_TOLERANCE = 1e-12  # proposal rows: absolute, in order
ROW_BYTES = 5 * 8  # a proposal row: 5 float64 values, as mmsd_proposals returns them

PRESETS = {
    "tiny": [("thumos", 6, 120)],
    "quick": [("thumos", workloads.THUMOS_VIDEOS, workloads.THUMOS_MAX_LEN)],
    "full": [
        ("thumos", workloads.THUMOS_VIDEOS, workloads.THUMOS_MAX_LEN),
        ("activitynet", workloads.ACTIVITYNET_VIDEOS, workloads.ACTIVITYNET_MAX_LEN),
    ],
}
# What --quick times: the goal is set on the pipeline (and MMSD's protocol).
MAIN_PASSES = ("proposals", "pipeline", "mmsd_protocol")

_REFERENCE_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "localization_reference.py")


def parse(token):
    t = token.lower()
    if t in ("thumos", "thumos-localization"):
        return PRESETS["full"][0]
    if t in ("activitynet", "anet"):
        return PRESETS["full"][1]
    if t.startswith("videos="):
        n = t.split("=", 1)[1]
        return ("thumos", int(n), workloads.THUMOS_MAX_LEN) if n.isdigit() and int(n) > 0 else None
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
    kind, videos, max_len = spec
    device = ctx.device
    rng = np.random.RandomState(ctx.seed)
    if kind == "activitynet":
        video_scores, lengths, gt = workloads.activitynet_annotations(rng, videos=videos, max_len=max_len)
    else:
        video_scores, lengths, gt = workloads.thumos_annotations(rng, videos=videos, max_len=max_len)
    V, C = video_scores.shape
    T = int(lengths.max())
    thumos = workloads.thumos14_annotations(gt, V, C) if kind == "thumos" else None
    data = {}

    def inputs():
        # The scores are drawn on first use (hundreds of MB at ActivityNet
        # size), from the same generator right after the annotations.
        if "cas" not in data:
            data["cas"] = workloads.localization_cas(rng, lengths, gt, C)
        return data["cas"], video_scores, lengths, gt, thumos

    def anchor_predictions():
        # The map pass scores the same predictions whoever times it: the
        # anchor's when it runs, else the automatic backend's.
        if "preds" not in data:
            cas = inputs()[0]
            if loops is not None:
                data["preds"] = _rows(loops[0](cas, video_scores, lengths))
            else:
                data["preds"] = _rows(public[0](torch.from_numpy(cas), torch.from_numpy(video_scores), torch.from_numpy(lengths)))
        return data["preds"]

    providers = []
    if public is not None:
        backends = ctx.mmsd_backends()
        if ctx.device != "cpu" and ctx.preset == "quick":
            # The reference on CUDA tensors takes seconds a call (about 25 s a case on an
            # H200), time a quick GPU run needs for its goal sizes; the full preset times it.
            backends = [b for b in backends if b != "reference"] or backends
        timed_map = next((b for b in backends if b != "reference"), backends[0] if backends else None)
        for backend in backends:
            providers.append(_public_provider(public, backend, inputs, device, anchor_predictions, with_map=backend == timed_map))
    if loops is not None:
        providers.append(_loops_provider(loops, inputs, anchor_predictions))

    def least(expected):
        P = len(expected[0])
        G = len(gt)
        cas_bytes = V * T * C * 4 + V * C * 4 + V * 8
        gt_bytes = G * 4 * 8
        return {
            "proposals": cas_bytes + P * ROW_BYTES,
            "map": P * ROW_BYTES + gt_bytes,
            "pipeline": cas_bytes + gt_bytes,
            "mmsd_protocol": cas_bytes + gt_bytes,
        }

    passes = ("proposals", "map", "pipeline", "mmsd_protocol") if thumos is not None else ("proposals", "map", "pipeline")
    label = f"V={V} T<={T} C={C} GT={len(gt)}"
    return Case(
        op=OP,
        shape=label if kind == "thumos" else f"activitynet {label}",
        dtype="float32",
        passes=passes,
        least_bytes=least,
        providers=providers,
        roles={"eager": "python_loops", "reference": "reference"},
        compare=_compare,
        main_passes=MAIN_PASSES,
    )


def _public_provider(public, backend, inputs, device, anchor_predictions, with_map):
    proposals_fn, map_fn, protocol_fn = public

    def build():
        cas, video_scores, lengths, gt, thumos = inputs()
        cas_t = torch.from_numpy(cas).to(device)
        vs_t = torch.from_numpy(video_scores).to(device)
        len_t = torch.from_numpy(lengths).to(device)
        gt_t = torch.from_numpy(gt)

        def proposals():
            return proposals_fn(cas_t, vs_t, len_t, backend=backend)

        def pipeline():
            p = proposals_fn(cas_t, vs_t, len_t, backend=backend)
            return p, map_fn(p, gt_t, TIOUS)

        passes = {"proposals": proposals, "pipeline": pipeline}
        if with_map:
            preds_t = torch.from_numpy(anchor_predictions()).to(device)  # float64, as mmsd_proposals returns them
            passes["map"] = lambda: map_fn(preds_t, gt_t, TIOUS)
        if protocol_fn is not None and thumos is not None:
            passes["mmsd_protocol"] = lambda: _call_protocol(protocol_fn, cas_t, vs_t, len_t, thumos, backend=backend)

        def result():
            p, m = pipeline()
            return _rows(p), _map_values(m), _protocol_result(passes)

        # No result_pass: result() also runs the MMSD protocol, so it is no pipeline sample.
        return {"passes": passes, "result": result}

    return Provider(backend, "mmsd_ext", build, device=device, jit=backend == "triton")


def _loops_provider(loops, inputs, anchor_predictions):
    proposals_fn, map_fn, protocol_fn = loops

    def build():
        cas, video_scores, lengths, gt, thumos = inputs()
        preds = anchor_predictions()

        def pipeline():
            p = proposals_fn(cas, video_scores, lengths)
            return p, map_fn(_rows(p), gt, TIOUS)

        passes = {
            "proposals": lambda: proposals_fn(cas, video_scores, lengths),
            "map": lambda: map_fn(preds, gt, TIOUS),
            "pipeline": pipeline,
        }
        if protocol_fn is not None and thumos is not None:
            passes["mmsd_protocol"] = lambda: _call_protocol(protocol_fn, cas, video_scores, lengths, thumos)

        def result():
            p, m = pipeline()
            return _rows(p), _map_values(m), _protocol_result(passes)

        # No result_pass: result() also runs the MMSD protocol, so it is no pipeline sample.
        return {"passes": passes, "result": result}

    return Provider("python_loops", "anchor", build, device="cpu")


def _call_protocol(fn, cas, video_scores, lengths, thumos, **backend):
    names, segments, labels, classes, ambiguous = thumos
    return fn(cas, video_scores, names, segments, labels, classes, lengths=lengths, ambiguous=ambiguous, tiou_thresholds=TIOUS, **backend)


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
    elif len(e_rows):
        # Same rows in the same order (video, class, then NMS order).
        diff = np.abs(e_rows - g_rows)
        bad = np.flatnonzero(~(diff <= ROW_TOLERANCE).all(axis=1))
        if len(bad):
            notes.append(f"{len(bad)} proposal rows differ (first: row {bad[0]}, by up to {float(np.nanmax(diff[bad[0]])):.2g})")
    return "ok" if not notes else "differs: " + "; ".join(notes)
