"""Plain Python-loop references of MMSD's localization and evaluation protocols.

Deliberately naive: loops over videos, classes, thresholds, snippets, segments
and Python sets, the way WTAL evaluation code is usually written. They are the
oracles of tests/test_localize.py and tests/test_evaluate.py and the "Python
loops" anchor of the benchmark suite. Entry points:

- ``mmsd_proposals_loops``: proposals + per-(video, class) NMS (MMSD's getActLoc);
- ``detection_map_loops``: ActivityNet-style mAP at tIoU thresholds;
- ``thumos14_map_loops``: MMSD's getLocMAP protocol (snippet conversion, ambiguous
  filtering, set IoU);
- ``mmsd_localization_map_loops``: both of the above end to end (the benchmark anchor);
- ``classification_map_loops``: MMSD's (W-TALC's) classification mAP;
- ``thumos_like_workload``: a deterministic THUMOS14-sized synthetic workload.

Every function returns plain Python numbers and lists; AP values are fractions in [0, 1].
"""

import math
import random

import numpy as np

DEFAULT_TIOUS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def _to_lists(cas, lengths):
    """cas: padded [V, T, C] array/tensor or a list of [T_i, C] arrays -> list of [T_i][C] float lists."""
    if hasattr(cas, "detach"):
        cas = cas.detach().cpu().double().numpy()
    if isinstance(cas, np.ndarray) and cas.ndim == 3:
        V, T = cas.shape[:2]
        if lengths is None:
            lengths = [T] * V
        lengths = [int(x) for x in (lengths.tolist() if hasattr(lengths, "tolist") else lengths)]
        return [np.asarray(cas[v, : lengths[v]], dtype=np.float64).tolist() for v in range(V)]
    return [np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=np.float64).tolist() for x in cas]


def mmsd_proposals_loops(
    cas, video_scores, lengths=None, thresholds=None, class_threshold=0.2, min_len=2, outer_ratio=0.25, nms_threshold=0.4
):
    """Rows [video, class, start, end, score] by video, class, then NMS order."""
    videos = _to_lists(cas, lengths)
    if hasattr(video_scores, "detach"):
        video_scores = video_scores.detach().cpu().double().numpy()
    video_scores = np.asarray(video_scores, dtype=np.float64).tolist()
    if thresholds is None:
        thresholds = np.arange(0.0003, 0.01, 0.0005)
    thresholds = [float(t) for t in thresholds]
    rows = []
    for v, frames in enumerate(videos):
        T = len(frames)
        num_classes = len(video_scores[v])
        for c in range(num_classes):
            if video_scores[v][c] < class_threshold:
                continue
            x = [frames[t][c] for t in range(T)]
            proposals = []  # (start, stored end, score), in threshold then start order
            for thr in thresholds:
                t = 0
                while t < T:
                    if not x[t] > thr:
                        t += 1
                        continue
                    s = t
                    while t < T and x[t] > thr:
                        t += 1
                    e = t  # the run is [s, e)
                    if e - s < min_len:
                        continue
                    inner_values = x[s : e + 1]
                    inner = _sum_left_to_right(inner_values) / len(inner_values)
                    length = e - s
                    left = max(0, int(s - outer_ratio * length))
                    right = min(T - 1, int(e + outer_ratio * length + 1))
                    outer_values = [x[i] for i in range(left, s)] + [x[i] for i in range(e + 1, right)]
                    outer = _sum_left_to_right(outer_values) / len(outer_values) if outer_values else 0.0
                    proposals.append((s, e + 1, inner - outer))
            for i in _nms_other_loops(proposals, nms_threshold):
                s, e, score = proposals[i]
                rows.append([v, c, s, e, score])
    return rows


def _sum_left_to_right(values):
    """0 + values[0] + values[1] + ..., one float64 addition at a time.

    Spelled out because the built-in sum() compensates its rounding from Python
    3.12 on: the proposal scores are defined as this plain loop's sums.
    """
    total = 0.0
    for value in values:
        total += value
    return total


def _nms_other_loops(proposals, threshold):
    """MMSD's NMS: overlap = inclusive intersection / inclusive length of the candidate."""
    order = sorted(range(len(proposals)), key=lambda i: (-proposals[i][2], i))
    kept = []
    for i in order:
        s, e, _ = proposals[i]
        suppressed = False
        for j in kept:
            ks, ke, _ = proposals[j]
            inter = max(0, min(e, ke) - max(s, ks) + 1)
            if inter / (e - s + 1) > threshold:
                suppressed = True
                break
        if not suppressed:
            kept.append(i)
    return kept


def _voc_ap(tp, num_positives):
    """VOC-interpolated AP from the 0/1 hits of predictions in ranking order."""
    if sum(tp) == 0:
        return 0.0
    precision, recall = [], []
    hits = 0
    for n, hit in enumerate(tp, start=1):
        hits += hit
        precision.append(hits / n)
        recall.append(hits / num_positives)
    mprec = [0.0] + precision + [0.0]
    mrec = [0.0] + recall + [1.0]
    for i in range(len(mprec) - 2, -1, -1):
        mprec[i] = max(mprec[i], mprec[i + 1])
    ap = 0.0
    for i in range(1, len(mrec)):
        if mrec[i] != mrec[i - 1]:
            ap += (mrec[i] - mrec[i - 1]) * mprec[i]
    return ap


def _interval_iou(a0, a1, b0, b1):
    inter = max(0.0, min(a1, b1) - max(a0, b0))
    union = (a1 - a0) + (b1 - b0) - inter
    return inter / union if union > 0 else 0.0


def detection_map_loops(predictions, ground_truth, tiou_thresholds=DEFAULT_TIOUS):
    """ActivityNet semantics. Returns (classes, ap[t][c], map[t], average)."""
    predictions = [[float(x) for x in row] for row in _rows(predictions)]
    ground_truth = [[float(x) for x in row] for row in _rows(ground_truth)]
    classes = sorted({int(g[1]) for g in ground_truth})
    ap = []
    for t in tiou_thresholds:
        ap_t = []
        for c in classes:
            preds = [p for p in predictions if int(p[1]) == c]
            preds = sorted(preds, key=lambda p: -p[4])  # stable: ties keep input order
            gts = [g for g in ground_truth if int(g[1]) == c]
            used = [False] * len(gts)
            tp = []
            for p in preds:
                best, best_iou = None, -1.0
                for j, g in enumerate(gts):
                    if used[j] or g[0] != p[0]:
                        continue
                    iou = _interval_iou(p[2], p[3], g[2], g[3])
                    if iou >= t and iou > best_iou:
                        best, best_iou = j, iou
                if best is not None:
                    used[best] = True
                tp.append(1 if best is not None else 0)
            ap_t.append(_voc_ap(tp, len(gts)))
        ap.append(ap_t)
    maps = [sum(row) / len(row) for row in ap]
    return classes, ap, maps, sum(maps) / len(maps)


def _rows(x):
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    return x.tolist() if x.size else []


def _name(x):
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def read_ambiguous_loops(ambiguous):
    """Ambiguous_test.txt lines (name, two spaces, start, end) or (name, start, end) tuples."""
    if ambiguous is None:
        return []
    if isinstance(ambiguous, str):
        with open(ambiguous) as f:
            return [(p[0], float(p[1]), float(p[2])) for p in (line.split() for line in f) if p]
    return [(_name(a[0]), float(a[1]), float(a[2])) for a in ambiguous]


def thumos14_map_loops(
    predictions,
    video_names,
    gt_segments,
    gt_labels,
    class_names,
    ambiguous=None,
    tiou_thresholds=DEFAULT_TIOUS,
    factor=25.0 / 16.0,
    zero_map_if_class_empty=False,
):
    """MMSD's getLocMAP protocol, with sets of snippet indices. Returns (classes, ap[t][c], map[t], average)."""
    names = [_name(v) for v in video_names]
    classes_all = [_name(c) for c in class_names]
    predictions = [[float(x) for x in row] for row in _rows(predictions)]
    ambiguous = read_ambiguous_loops(ambiguous)
    has_gt = [len(gt_segments[v]) > 0 for v in range(len(names))]
    present = sorted({classes_all.index(_name(lab)) for v in range(len(names)) for lab in gt_labels[v]})

    kept = []
    for p in predictions:
        v = int(p[0])
        if not has_gt[v]:
            continue
        pred_set = set(range(int(p[2]), int(p[3])))
        ambiguous_hit = False
        for name, a0, a1 in ambiguous:
            if name == names[v]:
                amb_set = set(range(int(round(a0 * factor)), int(round(a1 * factor))))
                if len(amb_set & pred_set) > 0:
                    ambiguous_hit = True
        if not ambiguous_hit:
            kept.append(p)

    ap = []
    any_class_empty = False
    for t in tiou_thresholds:
        ap_t = []
        for c in present:
            preds = sorted([p for p in kept if int(p[1]) == c], key=lambda p: -p[4])
            if not preds:
                any_class_empty = True
            gts = [
                (v, gt_segments[v][j][0], gt_segments[v][j][1])
                for v in range(len(names))
                for j in range(len(gt_segments[v]))
                if classes_all.index(_name(gt_labels[v][j])) == c
            ]
            num_positives = len(gts)
            tp = []
            for p in preds:
                pred_set = set(range(int(p[2]), int(p[3])))
                best, best_iou = None, 0.0
                for j, (v, g0, g1) in enumerate(gts):
                    if v != int(p[0]):
                        continue
                    gt_set = set(range(int(round(g0 * factor)), int(round(g1 * factor))))
                    union = len(gt_set | pred_set)
                    iou = len(gt_set & pred_set) / union if union else 0.0
                    if iou >= t and iou > best_iou:
                        best, best_iou = j, iou
                if best is not None:
                    del gts[best]
                tp.append(1 if best is not None else 0)
            ap_t.append(_voc_ap(tp, num_positives))
        ap.append(ap_t)
    maps = [sum(row) / len(row) for row in ap]
    if zero_map_if_class_empty and any_class_empty:
        maps = [0.0 for _ in maps]
    return present, ap, maps, sum(maps) / len(maps)


def mmsd_localization_map_loops(
    cas,
    video_scores,
    video_names,
    gt_segments,
    gt_labels,
    class_names,
    lengths=None,
    ambiguous=None,
    tiou_thresholds=DEFAULT_TIOUS,
    **proposal_options,
):
    """The whole protocol in loops: proposals, NMS, ambiguous filtering, mAP at every tIoU."""
    rows = mmsd_proposals_loops(cas, video_scores, lengths, **proposal_options)
    return thumos14_map_loops(rows, video_names, gt_segments, gt_labels, class_names, ambiguous, tiou_thresholds)


def classification_map_loops(video_scores, labels):
    """Mean over classes with a positive video of sum(precision at positives) / positives."""
    scores = _rows(video_scores)
    labels = _rows(labels)
    aps = []
    for c in range(len(scores[0])):
        ranked = sorted(range(len(scores)), key=lambda v: -scores[v][c])
        positives = sum(1 for v in range(len(scores)) if labels[v][c] == 1)
        if positives == 0:
            continue
        hits, total = 0, 0.0
        for n, v in enumerate(ranked, start=1):
            if labels[v][c] == 1:
                hits += 1
                total += hits / n
        aps.append(total / positives)
    return sum(aps) / len(aps)


def thumos_like_workload(seed=0, videos=212, classes=20, mean_len=340, max_len=2600, fps_factor=25.0 / 16.0):
    """A deterministic THUMOS14-sized workload in the W-TALC layout.

    Returns a dict: ``cas`` (list of [T_i, C] float32 arrays, MMSD-like magnitudes:
    most values far below MMSD's thresholds 0.0003-0.0098, noisy crossings
    around them, actions well above), ``video_scores`` [V, C] float32,
    ``video_names``, ``gt_segments`` (per video, [start, end] seconds),
    ``gt_labels`` (per video, class names), ``class_names``, ``ambiguous``
    ((name, start, end) seconds) and ``lengths``.
    """
    rng = np.random.default_rng(seed)
    pyrng = random.Random(seed)
    class_names = [f"Action{c:02d}" for c in range(classes)]
    lengths = np.clip(rng.lognormal(math.log(mean_len) - 0.32, 0.8, size=videos), 30, max_len).astype(int)
    lengths[0] = max_len
    cas, scores, names, segments, labels, ambiguous = [], [], [], [], [], []
    for v in range(videos):
        T = int(lengths[v])
        name = f"video_test_{v:07d}"
        names.append(name)
        active = sorted(pyrng.sample(range(classes), pyrng.choice([1, 1, 1, 2])))
        noise = rng.normal(size=(T, classes))
        kernel = np.ones(5) / 5
        smooth = np.stack([np.convolve(noise[:, c], kernel, mode="same") for c in range(classes)], axis=1)
        x = np.exp(-7.0 + 3.4 * smooth)
        segs, labs = [], []
        for c in active:
            n_inst = 1 + int(rng.integers(0, max(2, T // 20)))
            for _ in range(n_inst):
                length = int(rng.integers(3, 40))
                start = int(rng.integers(0, max(1, T - length)))
                x[start : start + length, c] += rng.uniform(0.02, 0.4) * np.exp(0.3 * rng.normal(size=min(length, T - start)))
                segs.append([start / fps_factor, (start + length) / fps_factor])
                labs.append(class_names[c])
        if v % 25 == 7:  # a few videos without temporal annotation, as in THUMOS14
            segs, labs = [], []
        if segs and v % 3 == 0:
            a = pyrng.choice(segs)
            ambiguous.append((name, a[1] + 1.0, a[1] + 3.0))
        s = rng.uniform(0.0, 0.15, size=classes)
        s[active] = rng.uniform(0.25, 0.95, size=len(active))
        if pyrng.random() < 0.25:  # a confusable class that passes MMSD's class threshold
            s[pyrng.randrange(classes)] = max(0.21, float(s.max()) * 0.5)
        cas.append(x.astype(np.float32))
        scores.append(s.astype(np.float32))
        segments.append(segs)
        labels.append(labs)
    return {
        "cas": cas,
        "video_scores": np.stack(scores),
        "video_names": names,
        "gt_segments": segments,
        "gt_labels": labels,
        "class_names": class_names,
        "ambiguous": ambiguous,
        "lengths": [int(t) for t in lengths],
    }
