"""detection_map, the THUMOS14 protocol, classification_map and the JSON export, against Python-loop references."""

import io
import json
import warnings

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from localization_reference import (
    classification_map_loops,
    detection_map_loops,
    mmsd_localization_map_loops,
    read_ambiguous_loops,
    thumos14_map_loops,
    thumos_like_workload,
)

from mmsd_ext.evaluate import (
    DEFAULT_TIOUS,
    classification_map,
    detection_map,
    export_detections_json,
    mmsd_detection_map,
    read_ambiguous,
    thumos14_detection_map,
)

EXACT = 1e-12  # the vectorised AP sums the same terms in another order


def assert_same_map(result, reference):
    classes, ap, maps, average = reference
    assert result.classes.tolist() == list(classes)
    np.testing.assert_allclose(result.ap, np.array(ap).reshape(result.ap.shape), rtol=0, atol=EXACT)
    np.testing.assert_allclose(result.map, maps, rtol=0, atol=EXACT)
    assert abs(result.average - average) < EXACT


@st.composite
def detections(draw, integral=None, score_levels=None):
    """Predictions and ground truth over a few videos and classes; coarse scores make ties."""
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    P = draw(st.integers(0, 60))
    G = draw(st.integers(1, 25))
    videos = draw(st.integers(1, 5))
    classes = draw(st.integers(1, 4))
    integral = draw(st.booleans()) if integral is None else integral
    levels = draw(st.sampled_from([3, 1000])) if score_levels is None else score_levels

    def bounds(n):
        if integral:
            start = rng.integers(0, 40, n).astype(float)
            return start, start + rng.integers(0, 12, n)
        start = rng.uniform(0, 40, n)
        return start, start + rng.uniform(0, 12, n)

    ps, pe = bounds(P)
    gs, ge = bounds(G)
    pred = np.column_stack([rng.integers(0, videos, P), rng.integers(0, classes, P), ps, pe, rng.integers(0, levels, P) / levels])
    gt = np.column_stack([rng.integers(0, videos, G), rng.integers(0, classes, G), gs, ge])
    return pred.reshape(-1, 5), gt


@given(detections(), st.sampled_from([DEFAULT_TIOUS, (0.5,), (0.3, 0.95, 1.0)]))
def test_detection_map_matches_loops(data, tious):
    pred, gt = data
    assert_same_map(detection_map(pred, gt, tious), detection_map_loops(pred, gt, tious))


@given(detections())
def test_ap_is_in_unit_interval(data):
    result = detection_map(*data)
    assert ((result.ap >= 0) & (result.ap <= 1)).all()
    assert 0 <= result.average <= 1


@given(detections(integral=False, score_levels=10**9))
def test_prediction_row_order_does_not_matter_without_ties(data):
    pred, gt = data
    assume(len(np.unique(pred[:, 4])) == len(pred))
    perm = np.random.default_rng(len(pred)).permutation(len(pred))
    a, b = detection_map(pred, gt), detection_map(pred[perm], gt)
    np.testing.assert_array_equal(a.ap, b.ap)


@given(detections(integral=False, score_levels=10**9))
def test_ground_truth_row_order_does_not_matter_without_ties(data):
    # With continuous endpoints, equal IoUs (the only place the ground-truth order counts) do not occur.
    pred, gt = data
    perm = np.random.default_rng(len(gt)).permutation(len(gt))
    a, b = detection_map(pred, gt), detection_map(pred, gt[perm])
    np.testing.assert_array_equal(a.ap, b.ap)


@given(detections(), st.data())
def test_a_perfect_prediction_of_an_unmatched_ground_truth_never_lowers_ap(data, draw):
    pred, gt = data
    # A ground-truth segment no prediction overlaps is unmatched at every threshold.
    free = [
        j
        for j, g in enumerate(gt)
        if g[3] > g[2]
        and not any(p[0] == g[0] and p[1] == g[1] and min(p[3], g[3]) - max(p[2], g[2]) > 0 for p in pred)
    ]
    assume(free)
    g = gt[draw.draw(st.sampled_from(free))]
    top = pred[:, 4].max() + 1 if len(pred) else 1.0
    better = np.vstack([pred, [[g[0], g[1], g[2], g[3], top]]])
    before, after = detection_map(pred, gt), detection_map(better, gt)
    assert (after.ap >= before.ap - EXACT).all()


@given(detections())
def test_a_new_ground_truth_with_a_perfect_top_prediction_never_lowers_ap(data):
    pred, gt = data
    video = gt[:, 0].max() + 1  # a fresh video, so nothing else can match it
    cls = gt[0, 1]
    top = pred[:, 4].max() + 1 if len(pred) else 1.0
    before = detection_map(pred, gt)
    after = detection_map(np.vstack([pred, [[video, cls, 3.0, 9.0, top]]]), np.vstack([gt, [[video, cls, 3.0, 9.0]]]))
    assert (after.ap >= before.ap - EXACT).all()


def test_a_duplicate_detection_is_a_false_positive():
    # Two ground truths; each prediction overlaps only its own. Adding a perfect
    # copy of the first at the top takes that ground truth, so the old prediction
    # of it becomes a false positive: AP 1 -> 0.5 * 1 + 0.5 * 2/3.
    gt = np.array([[0, 0, 0, 10], [0, 0, 20, 30]], dtype=float)
    pred = np.array([[0, 0, 0, 9, 0.9], [0, 0, 20, 29, 0.8]])
    assert detection_map(pred, gt, (0.5,)).ap[0, 0] == 1.0
    worse = np.vstack([[0, 0, 0, 10, 1.0], pred])
    assert abs(detection_map(worse, gt, (0.5,)).ap[0, 0] - (0.5 + 0.5 * 2 / 3)) < EXACT
    assert_same_map(detection_map(worse, gt, (0.5,)), detection_map_loops(worse, gt, (0.5,)))


def test_best_iou_wins_and_equal_ious_take_the_earlier_ground_truth():
    gt = np.array([[0, 0, 0, 10], [0, 0, 2, 12], [0, 0, 4, 14]], dtype=float)
    # IoU with gt 1 is 1, so it is taken although gt 0 also qualifies.
    pred = np.array([[0, 0, 2, 12, 0.9], [0, 0, 3, 13, 0.8]])
    assert_same_map(detection_map(pred, gt, (0.5,)), detection_map_loops(pred, gt, (0.5,)))
    # At tIoU 0.7, [3, 13] has IoU 9/11 with gt 1 and with gt 2, and takes gt 1 (the earlier).
    # Then [4, 14] takes gt 2 (IoU 1) and [2, 12] finds gt 1 taken (gt 0: 8/12 < 0.7):
    # hits [1, 1, 0], AP 2/3. Had the tie gone to gt 2, the hits would be [1, 0, 1], AP 5/9.
    pred = np.array([[0, 0, 3, 13, 0.9], [0, 0, 4, 14, 0.8], [0, 0, 2, 12, 0.7]])
    result = detection_map(pred, gt, (0.7,))
    assert result.ap[0, 0] == pytest.approx(2 / 3, abs=EXACT)
    assert_same_map(result, detection_map_loops(pred, gt, (0.7,)))


def _activitynet_style_map(pred, gt, tious):
    """mAP as ActivityNet's compute_average_precision_detection computes it, step by step:
    per class, predictions by ``argsort()[::-1]`` of the scores, each trying its video's
    ground truth by ``argsort()[::-1]`` of the IoUs, a miss below the threshold, a locked
    row skipped; precision made monotone from the right, summed where recall steps."""
    maps = np.zeros(len(tious))
    classes = np.unique(gt[:, 1])
    for c in classes:
        g, p = gt[gt[:, 1] == c], pred[pred[:, 1] == c]
        tp = np.zeros((len(tious), len(p)))
        fp = np.zeros((len(tious), len(p)))
        locked = np.full((len(tious), len(g)), -1)
        for rank, i in enumerate(p[:, 4].argsort()[::-1]):
            rows = np.flatnonzero(g[:, 0] == p[i, 0])
            if rows.size == 0:
                fp[:, rank] = 1
                continue
            inter = np.clip(np.minimum(p[i, 3], g[rows, 3]) - np.maximum(p[i, 2], g[rows, 2]), 0, None)
            iou = inter / ((p[i, 3] - p[i, 2]) + (g[rows, 3] - g[rows, 2]) - inter)
            for t, thr in enumerate(tious):
                for j in iou.argsort()[::-1]:
                    if iou[j] < thr:
                        fp[t, rank] = 1
                        break
                    if locked[t, rows[j]] >= 0:
                        continue
                    tp[t, rank] = 1
                    locked[t, rows[j]] = i
                    break
                if tp[t, rank] == 0 and fp[t, rank] == 0:
                    fp[t, rank] = 1
        for t in range(len(tious)):
            hits, misses = np.cumsum(tp[t]), np.cumsum(fp[t])
            recall = np.concatenate([[0.0], hits / len(g), [1.0]])
            precision = np.concatenate([[0.0], hits / np.maximum(hits + misses, 1e-300), [0.0]])
            for k in range(len(precision) - 2, -1, -1):
                precision[k] = max(precision[k], precision[k + 1])
            steps = np.flatnonzero(recall[1:] != recall[:-1]) + 1
            maps[t] += np.sum((recall[steps] - recall[steps - 1]) * precision[steps]) / len(classes)
    return maps


@given(st.integers(0, 2**31 - 1))
def test_detection_map_equals_activitynet_steps_without_ties(seed):
    # Distinct scores and continuous coordinates of positive length: no tie in score
    # or in a positive IoU, the only places where the two rules differ (the docstring).
    rng = np.random.default_rng(seed)
    P, G = int(rng.integers(0, 50)), int(rng.integers(1, 20))
    videos, classes = int(rng.integers(1, 4)), int(rng.integers(1, 4))

    def rows(n):
        start = rng.uniform(0, 40, n)
        return np.column_stack([rng.integers(0, videos, n), rng.integers(0, classes, n), start, start + rng.uniform(0.5, 12, n)])

    gt = rows(G)
    pred = np.column_stack([rows(P), rng.permutation(P) / max(P, 1) + 0.001]).reshape(-1, 5)
    for tious in (DEFAULT_TIOUS, tuple(np.arange(0.5, 0.96, 0.05))):
        np.testing.assert_allclose(detection_map(pred, gt, tious).map, _activitynet_style_map(pred, gt, tious),
                                   rtol=0, atol=EXACT)


def test_ties_take_the_earlier_row_where_activitynet_steps_take_the_later():
    # Tied scores: ActivityNet's argsort()[::-1] ranks the later row first (numpy's sort
    # keeps this small array's tie in input order, the reversal flips it).
    gt = np.array([[0, 0, 0, 10]], dtype=float)
    pred = np.array([[0, 0, 20, 30, 0.5], [0, 0, 0, 10, 0.5]])
    assert detection_map(pred, gt, (0.5,)).map[0] == 0.5
    assert _activitynet_style_map(pred, gt, (0.5,))[0] == 1.0
    # Tied IoUs (1/3 with both rows): ActivityNet's tries the later ground truth first.
    gt = np.array([[0, 0, 0, 10], [0, 0, 10, 20]], dtype=float)
    pred = np.array([[0, 0, 5, 15, 0.9], [0, 0, 10, 20, 0.8]])
    assert detection_map(pred, gt, (0.3,)).map[0] == 1.0
    assert _activitynet_style_map(pred, gt, (0.3,))[0] == 0.5


def test_edge_cases():
    gt = np.array([[0, 0, 0, 10], [1, 1, 5, 5], [2, 2, 3, 8]], dtype=float)
    # class 1's only ground truth has length 0: nothing can match it; class 2 has no prediction;
    # class 7 is not in the ground truth and is ignored; video 9 has no ground truth (false positive).
    pred = np.array([[0, 0, 0, 10, 0.5], [1, 1, 5, 5, 0.9], [0, 7, 0, 10, 0.99], [9, 0, 0, 10, 0.7]])
    result = detection_map(pred, gt)
    assert result.classes.tolist() == [0, 1, 2]
    assert result.num_predictions.tolist() == [2, 1, 0] and result.num_ground_truth.tolist() == [1, 1, 1]
    np.testing.assert_array_equal(result.ap[:, 1:], 0.0)
    np.testing.assert_allclose(result.ap[:, 0], 0.5)  # the false positive on video 9 ranks first
    assert_same_map(result, detection_map_loops(pred, gt))
    # No predictions at all: every AP is 0.
    for empty in (np.zeros((0, 5)), [], torch.zeros(0, 5)):
        assert detection_map(empty, gt).average == 0.0
    # Exact matches count at tIoU 1.
    assert detection_map([[0, 0, 0, 10, 1.0]], gt[:1], (1.0,)).average == 1.0


def test_tensors_and_arrays_agree():
    rng = np.random.default_rng(1)
    pred = np.column_stack([rng.integers(0, 3, 50), rng.integers(0, 2, 50), rng.uniform(0, 20, 50), rng.uniform(20, 30, 50), rng.uniform(size=50)])
    gt = np.column_stack([rng.integers(0, 3, 10), rng.integers(0, 2, 10), rng.uniform(0, 20, 10), rng.uniform(20, 30, 10)])
    a = detection_map(pred, gt)
    b = detection_map(torch.tensor(pred, dtype=torch.float64), torch.tensor(gt))
    np.testing.assert_array_equal(a.ap, b.ap)
    d = a.to_dict(class_names=["x", "y"])
    assert set(d["map"]) == {"0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7"}
    assert d["average_map"] == pytest.approx(100 * a.average) and set(d["ap"]) == {"x", "y"}
    assert "mAP" in str(a)


def test_to_dict_keys_keep_close_thresholds_apart():
    """Keys are short ("0.5") but never merge two thresholds: 0.9523809 and 0.9523810 are one
    key with 6 digits, and the mAP of one of them would be lost."""
    result = detection_map([[0, 0, 0, 10, 0.9]], [[0, 0, 0, 10.5]], (0.5, 0.9523809, 0.9523810))
    assert result.map.tolist() == [1.0, 1.0, 0.0]  # IoU 10 / 10.5 = 0.95238095...
    d = result.to_dict(percent=False)
    assert d["map"] == {"0.5": 1.0, "0.9523809": 1.0, "0.952381": 0.0}
    assert d["ap"]["0"] == d["map"]
    assert str(result).splitlines()[0].split()[1:4] == ["0.5", "0.9523809", "0.952381"]
    apart = detection_map([[0, 0, 0, 10, 0.9]], [[0, 0, 0, 10.5]], (0.5, 0.3, 0.3 + 2**-54))
    assert list(apart.to_dict()["map"]) == ["0.5", "0.29999999999999999", "0.30000000000000004"]


@pytest.mark.parametrize(
    "pred, gt, tious, match",
    [
        (np.zeros((2, 4)), np.zeros((1, 4)), DEFAULT_TIOUS, "predictions"),
        (np.zeros((2, 5)), np.zeros((1, 5)), DEFAULT_TIOUS, "ground_truth"),
        (np.zeros((0, 5)), np.zeros((0, 4)), DEFAULT_TIOUS, "ground_truth"),
        ([[0, -1, 0, 1, 0.5]], [[0, 0, 0, 1]], DEFAULT_TIOUS, "class"),
        ([[0.5, 0, 0, 1, 0.5]], [[0, 0, 0, 1]], DEFAULT_TIOUS, "video"),
        # 2**53 + 1 would round to 2**53 in float64, matching another video's ground truth.
        ([[2**53 + 1, 0, 0, 10, 0.9]], [[2**53, 0, 0, 10]], DEFAULT_TIOUS, r"predictions: column 0 \(video\) must hold integers in \[0, 2\*\*53\)"),
        ([[0, 0, 0, 1, 0.5]], [[0, 2**60, 0, 1]], DEFAULT_TIOUS, r"ground_truth: column 1 \(class\)"),
        ([[0, 0, 2, 1, 0.5]], [[0, 0, 0, 1]], DEFAULT_TIOUS, "predictions.*start <= end"),
        ([[0, 0, 0, 1, 0.5]], [[0, 0, 0, np.inf]], DEFAULT_TIOUS, "ground_truth"),
        ([[0, 0, 0, 1, np.nan]], [[0, 0, 0, 1]], DEFAULT_TIOUS, "NaN score"),
        ([[0, 0, 0, 1, 0.5]], [[0, 0, 0, 1]], (), "tiou_thresholds"),
        ([[0, 0, 0, 1, 0.5]], [[0, 0, 0, 1]], (0.0, 0.5), "tiou_thresholds"),
        ([[0, 0, 0, 1, 0.5]], [[0, 0, 0, 1]], (1.5,), "tiou_thresholds"),
        ([[0, 0, 0, 1, 0.5]], [[0, 0, 0, 1]], (0.5, 0.7, 0.5), r"^tiou_thresholds: 0\.5 is given twice$"),
        ("rows", [[0, 0, 0, 1]], DEFAULT_TIOUS, "predictions"),
        # Complex rows lost their imaginary parts with only numpy's warning.
        (np.array([[0, 0, 0, 1, 0.5 + 1j]]), [[0, 0, 0, 1]], DEFAULT_TIOUS, "predictions"),
        (torch.tensor([[0, 0, 0, 1, 0.5 + 1j]]), [[0, 0, 0, 1]], DEFAULT_TIOUS, "predictions: expected numeric rows of 5 columns .*, got a complex tensor"),
        ([[0, 0, 0, 1, 0.5]], np.array([[0, 0, 0, 1j]]), DEFAULT_TIOUS, "ground_truth"),
    ],
)
def test_detection_map_bad_inputs(pred, gt, tious, match):
    with pytest.raises(ValueError, match=match):
        detection_map(pred, gt, tious)


def test_tiou_thresholds_as_a_string_are_refused():
    # np.array("0.5", float) is 0.5: a string was read as one threshold.
    with pytest.raises(TypeError, match="^tiou_thresholds: expected a sequence of numbers, got str"):
        detection_map([[0, 0, 0, 1, 0.5]], [[0, 0, 0, 1]], "0.5")


# ---------------------------------------------------------------- THUMOS14 protocol

CLASSES = ["Alpha", "Beta", "Gamma"]


@st.composite
def thumos_cases(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    V = draw(st.integers(1, 5))
    names = [f"video_test_{v:07d}" for v in range(V)]
    segments, labels = [], []
    for v in range(V):
        n = int(rng.integers(0, 5)) if v else int(rng.integers(1, 5))
        # Multiples of 0.16 s land on x.0, x.25, x.5 and x.75 snippets: round half to even matters.
        start = rng.integers(0, 300, n) * 0.16
        segments.append(np.column_stack([start, start + rng.integers(0, 60, n) * 0.16]).tolist())
        labels.append([CLASSES[c] for c in rng.integers(0, len(CLASSES), n)])
    P = int(rng.integers(0, 50))
    start = rng.uniform(0, 75, P) if draw(st.booleans()) else rng.integers(0, 75, P).astype(float)
    pred = np.column_stack([rng.integers(0, V, P), rng.integers(0, len(CLASSES), P), start, start + rng.uniform(0, 15, P), rng.integers(0, 5, P) / 4])
    ambiguous = [(names[int(rng.integers(0, V))], s, s + float(rng.uniform(0, 3))) for s in rng.uniform(0, 40, int(rng.integers(0, 4)))]
    ambiguous.append(("video_not_evaluated", 0.0, 100.0))
    return pred.reshape(-1, 5), names, segments, labels, ambiguous


@given(thumos_cases(), st.booleans())
def test_thumos14_protocol_matches_loops(case, quirk):
    pred, names, segments, labels, ambiguous = case
    result = thumos14_detection_map(pred, names, segments, labels, CLASSES, ambiguous=ambiguous, zero_map_if_class_empty=quirk)
    assert_same_map(result, thumos14_map_loops(pred, names, segments, labels, CLASSES, ambiguous, zero_map_if_class_empty=quirk))


def test_ground_truth_rounds_half_to_even():
    # 1.6 s = 2.5 snippets -> 2 (half to even), 4.0 s = 6.25 -> 6. A prediction [2, 6) matches
    # exactly (IoU 1); with round-half-up the ground truth would be [3, 6) (IoU 0.75).
    assert 1.6 * 25 / 16 == 2.5 and round(1.6 * 25 / 16) == 2
    result = thumos14_detection_map([[0, 0, 2, 6, 1.0]], ["v"], [[[1.6, 4.0]]], [["Alpha"]], CLASSES, tiou_thresholds=(0.8,))
    assert result.ap.tolist() == [[1.0]]


def test_predictions_are_truncated_and_unannotated_videos_dropped():
    segments = [[[0.0, 6.4]], []]  # 6.4 s = 10 snippets; video 1 has no annotation
    # [0.9, 10.99] truncates to [0, 10): a perfect match. The prediction on video 1 is not a
    # false positive here (MMSD leaves unannotated videos out), though it outranks the other.
    pred = [[1, 0, 0, 10, 2.0], [0, 0, 0.9, 10.99, 1.0]]
    result = thumos14_detection_map(pred, ["a", "b"], segments, [["Alpha"], []], CLASSES)
    np.testing.assert_array_equal(result.ap, 1.0)
    assert result.num_predictions.tolist() == [1]


def test_ambiguous_filter_and_the_empty_class_quirk(tmp_path):
    names = ["video_test_0000001", "video_test_0000002"]
    segments = [[[0.0, 6.4]], [[0.0, 6.4]]]
    labels = [["Alpha"], ["Beta"]]
    pred = [[0, 0, 0, 10, 0.9], [1, 1, 0, 10, 0.8]]
    path = tmp_path / "Ambiguous_test.txt"
    # Two spaces after the name, as in the W-TALC files; 8.0-9.6 s = snippets [12, 15): no overlap
    # with [0, 10); 5.76-7.0 s = snippets [9, 11): overlaps the Beta prediction, which goes.
    path.write_text("video_test_0000001  8.0 9.6\nvideo_test_0000002  5.76 7.0\n\n")
    assert read_ambiguous(path) == [("video_test_0000001", 8.0, 9.6), ("video_test_0000002", 5.76, 7.0)]
    assert read_ambiguous(path) == read_ambiguous_loops(str(path))
    result = thumos14_detection_map(pred, names, segments, labels, CLASSES, ambiguous=str(path))
    assert result.ap[:, 0].tolist() == [1.0] * 7 and result.ap[:, 1].tolist() == [0.0] * 7
    np.testing.assert_allclose(result.map, 0.5)
    # A bytes path is a path too (it was read as a sequence of entries).
    assert thumos14_detection_map(pred, names, segments, labels, CLASSES, ambiguous=bytes(path)).ap.tolist() == result.ap.tolist()
    quirk = thumos14_detection_map(pred, names, segments, labels, CLASSES, ambiguous=path, zero_map_if_class_empty=True)
    np.testing.assert_array_equal(quirk.map, 0.0)
    assert quirk.average == 0.0
    np.testing.assert_array_equal(quirk.ap, result.ap)
    # Without the ambiguous list, both classes are found.
    assert thumos14_detection_map(pred, names, segments, labels, CLASSES, zero_map_if_class_empty=True).average == 1.0
    path.write_text("video_test_0000001 8.0\n")
    with pytest.raises(ValueError, match="line 1"):
        read_ambiguous(path)


def test_read_ambiguous_skips_a_byte_order_mark(tmp_path):
    # Saved by a Windows editor: the mark joined the first name, whose entry then matched no video.
    path = tmp_path / "Ambiguous_test.txt"
    path.write_bytes("video_test_0000001  8.0 9.6\nvideo_test_0000002  5.76 7.0\n".encode("utf-8-sig"))
    assert read_ambiguous(path) == [("video_test_0000001", 8.0, 9.6), ("video_test_0000002", 5.76, 7.0)]
    path.write_bytes(b"video_test_0000001  8.0 9.6\n\xef\xbb\xbfvideo_test_0000002  5.76 7.0\n")
    assert read_ambiguous(path)[1][0] == "\ufeffvideo_test_0000002"  # only a file's first bytes are a mark


def test_bytes_names_as_in_wtalc_files():
    result = thumos14_detection_map([[0, 1, 0, 10, 1.0]], np.array([b"v"]), [[[0.0, 6.4]]], [[b"Beta"]], np.array([c.encode() for c in CLASSES]))
    assert result.average == 1.0 and result.classes.tolist() == [1]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(gt_labels=[["Delta"]]), "gt_labels\\[0\\]\\[0\\].*unknown class"),
        (dict(gt_labels=[["Alpha", "Beta"]]), "gt_labels\\[0\\]"),
        (dict(gt_segments=[[[5.0, 1.0]]]), "gt_segments\\[0\\]"),
        (dict(gt_segments=[[[1.0, 2.0, 3.0]]]), "gt_segments\\[0\\]"),
        # A flat pair, not a list of pairs: the segments are named, not the labels' count.
        (dict(gt_segments=[[0.0, 1.0]]), "^gt_segments\\[0\\]: expected a sequence of \\[start, end\\] pairs, got the flat "
                                         "sequence \\[0.0, 1.0\\] \\(a video with one segment holds \\[\\[0.0, 1.0\\]\\]\\)$"),
        (dict(gt_segments=[np.array([0.0, 1.0])]), "^gt_segments\\[0\\]: expected a sequence of \\[start, end\\] pairs"),
        (dict(gt_segments=[[[0.0, 1.0]], []]), "gt_segments"),
        (dict(gt_segments=[[]], gt_labels=[[]]), "gt_segments"),
        (dict(predictions=[[1, 0, 0, 2, 0.5]]), "predictions.*video index 1"),
        (dict(predictions=[[0, 3, 0, 2, 0.5]]), "predictions.*class index 3"),
        (dict(predictions=[[0, 0, 0, 2]]), "predictions"),
        (dict(class_names=["A", "A"]), "class_names"),
        (dict(ambiguous=[("v", 1.0)]), "ambiguous\\[0\\]"),
        (dict(ambiguous=[("v", float("nan"), 2.0)]), "ambiguous\\[0\\]: expected finite start and end"),
        (dict(factor=0.0), "factor"),
        (dict(factor=2**1100), "factor"),
        # Finite, but seconds times it overflow: every AP was 0 after numpy's warning.
        (dict(factor=1e308, gt_segments=[[[0.0, 10.0]]]), r"^factor: ground-truth segment \(0\.0, 10\.0\) s of video 0 times factor 1e\+308 is not finite"),
        # A name that is not text was taken as its repr (None as a video named 'None').
        (dict(ambiguous=[(None, 1.0, 2.0)]), r"^ambiguous\[0\]: expected \(name, start, end\), got \(None, 1\.0, 2\.0\)"),
    ],
)
def test_thumos14_bad_inputs(kwargs, match):
    args = dict(predictions=[[0, 0, 0, 2, 0.5]], video_names=["v"], gt_segments=[[[0.0, 1.0]]], gt_labels=[["Alpha"]], class_names=CLASSES)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        thumos14_detection_map(**args)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        # Each raised a bare "object of type ... has no len()" or was read as a name.
        (dict(gt_segments=[None]), r"^gt_segments\[0\]: expected a sequence of \[start, end\] seconds, got NoneType$"),
        (dict(gt_segments={0: [[0.0, 1.0]]}), r"^gt_segments: expected a sequence with one entry per video, got dict$"),
        (dict(gt_labels=[None]), r"^gt_labels\[0\]: expected a sequence of class names, one per segment, got NoneType$"),
        (dict(gt_labels=[[None]]), r"^gt_labels\[0\]\[0\]: expected a class name \(str or UTF-8 bytes\), got None$"),
        (dict(gt_labels=[[b"\xff"]]), r"^gt_labels\[0\]\[0\]: expected a class name \(str or UTF-8 bytes\), got b'\\xff'$"),
        (dict(video_names=[None]), r"^video_names\[0\]: expected a str or UTF-8 bytes, got NoneType$"),
        (dict(class_names=[0, 1, 2]), r"^class_names\[0\]: expected a str or UTF-8 bytes, got int$"),
        (dict(tiou_thresholds=None), r"^tiou_thresholds: expected a sequence of numbers, got NoneType None$"),
    ],
)
def test_thumos14_entries_of_the_wrong_type_are_named(kwargs, match):
    args = dict(predictions=[[0, 0, 0, 2, 0.5]], video_names=["v"], gt_segments=[[[0.0, 1.0]]], gt_labels=[["Alpha"]], class_names=CLASSES)
    args.update(kwargs)
    with pytest.raises(TypeError, match=match):
        thumos14_detection_map(**args)


@pytest.mark.parametrize("label", ["Alpha", "A", b"Alpha"])
def test_thumos14_refuses_a_class_name_where_a_video_has_a_list_of_them(label):
    # A string was read letter by letter: "A" passed as the one label of a one-segment video.
    with pytest.raises(TypeError, match="^gt_labels\\[0\\]: expected a sequence of class names, one per segment, got"):
        thumos14_detection_map([[0, 0, 0, 2, 0.5]], ["v"], [[[0.0, 1.0]]], [label], ["A", "Alpha"])


def test_ambiguous_of_another_type_is_refused_by_name(tmp_path):
    args = dict(predictions=[[0, 0, 0, 2, 0.5]], video_names=["v"], gt_segments=[[[0.0, 1.0]]], gt_labels=[["Alpha"]], class_names=CLASSES)
    with pytest.raises(TypeError, match="^ambiguous: expected None, a path or a sequence"):
        thumos14_detection_map(**args, ambiguous=5)
    path = tmp_path / "Ambiguous_test.txt"
    path.write_text("v  nan 9.6\n")
    with pytest.raises(ValueError, match="line 1"):
        read_ambiguous(path)
    # An end before the start overlapped nothing, silently.
    path.write_text("v  1.0 2.0\nw  9.6 8.0\n")
    with pytest.raises(ValueError, match=r"line 2: expected 'name start end' with end >= start, got 'w  9.6 8.0'$"):
        read_ambiguous(path)
    # A name that is not UTF-8 (the error named no line) reads as latin-1, as videoname.npy's.
    path.write_bytes(b"v  1.0 2.0\nvid\xe9o  3.0 4.0\n")
    assert read_ambiguous(path) == [("v", 1.0, 2.0), ("vid\u00e9o", 3.0, 4.0)]


def test_mmsd_detection_map_names_its_cas_argument():
    gt = dict(video_names=["a", "b"], gt_segments=[[[0.0, 1.0]]] * 2, gt_labels=[["Alpha"]] * 2, class_names=CLASSES)
    with pytest.raises(ValueError, match="^cas: expected at least one video"):
        mmsd_detection_map([], np.zeros((0, 3)), **gt)
    with pytest.raises(ValueError, match=r"^cas\[1\]: expected C = 3 columns like cas\[0\], got 2"):
        mmsd_detection_map([np.zeros((4, 3)), np.zeros((4, 2))], np.zeros((2, 3)), **gt)
    with pytest.raises(TypeError, match=r"^cas\[1\]: expected a \[T_i, C\] array or tensor, got str"):
        mmsd_detection_map([np.zeros((4, 3)), "x"], np.zeros((2, 3)), **gt)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        # len() of None, and numpy's or torch's own words for scores that are not a matrix of numbers.
        (dict(video_names=None), TypeError, "^video_names: expected a sequence of names, got NoneType$"),
        (dict(class_names=None), TypeError, "^class_names: expected a sequence of names, got NoneType$"),
        (dict(video_scores=[[0.0, 0.9, 0.0], [0.1]]), ValueError, r"^video_scores: expected a \[V, C\] array of numbers \(a ragged"),
        (dict(video_scores="ab"), TypeError, r"^video_scores: expected a \[V, C\] array of numbers, got str of <U2$"),
        (dict(video_scores=None), TypeError, r"^video_scores: expected a \[V, C\] array of numbers, got NoneType of object$"),
    ],
)
def test_mmsd_detection_map_names_its_other_arguments(kwargs, error, match):
    args = dict(cas=[np.zeros((4, 3)), np.zeros((4, 3))], video_scores=np.zeros((2, 3)), video_names=["a", "b"],
                gt_segments=[[[0.0, 1.0]]] * 2, gt_labels=[["Alpha"]] * 2, class_names=CLASSES)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        mmsd_detection_map(**args)


def test_mmsd_detection_map_end_to_end_matches_loops():
    w = thumos_like_workload(seed=3, videos=10, classes=4, mean_len=60, max_len=150)
    gt = (w["video_names"], w["gt_segments"], w["gt_labels"], w["class_names"])
    reference = mmsd_localization_map_loops(w["cas"], w["video_scores"], *gt, ambiguous=w["ambiguous"])
    from_list = mmsd_detection_map(w["cas"], w["video_scores"], *gt, ambiguous=w["ambiguous"])
    assert_same_map(from_list, reference)
    assert from_list.num_predictions.sum() > 0 and from_list.average > 0
    # The same through a padded tensor, float32 as a model produces it.
    cas = torch.zeros(len(w["cas"]), max(w["lengths"]), 4)
    for v, x in enumerate(w["cas"]):
        cas[v, : len(x)] = torch.from_numpy(x)
    padded = mmsd_detection_map(cas, torch.from_numpy(w["video_scores"]), *gt, lengths=torch.tensor(w["lengths"]), ambiguous=w["ambiguous"])
    np.testing.assert_array_equal(padded.ap, from_list.ap)
    with pytest.raises(ValueError, match="background"):
        mmsd_detection_map(torch.zeros(10, 5, 5), torch.zeros(10, 5), *gt)
    with pytest.raises(ValueError, match="lengths"):
        mmsd_detection_map(w["cas"], w["video_scores"], *gt, lengths=[1] * 10)


# ---------------------------------------------------------------- classification mAP


@given(st.integers(0, 2**31 - 1), st.integers(1, 30), st.integers(1, 6), st.booleans())
def test_classification_map_matches_loops(seed, V, C, ties):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 3, (V, C)) / 2 if ties else rng.uniform(size=(V, C))
    labels = (rng.uniform(size=(V, C)) < 0.4).astype(float)
    labels[0, 0] = 1
    value = classification_map(scores, labels)
    assert abs(value - classification_map_loops(scores, labels)) < EXACT
    assert 0 < value <= 1
    assert classification_map(torch.tensor(scores), torch.tensor(labels, dtype=torch.bool)) == value


def test_classification_map_perfect_and_bad_inputs():
    labels = np.eye(4)
    assert classification_map(labels * 0.9 + 0.05, labels) == 1.0
    with pytest.raises(ValueError, match="labels"):
        classification_map(np.zeros((4, 4)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="labels"):
        classification_map(np.zeros((4, 4)), labels * 2)
    with pytest.raises(ValueError, match="no class has a positive"):
        classification_map(np.zeros((4, 4)), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="video_scores"):
        classification_map(np.full((4, 4), np.nan), labels)
    with pytest.raises(ValueError, match="video_scores"):
        classification_map(np.zeros((0, 4)), np.zeros((0, 4)))
    with pytest.raises(ValueError, match="video_scores"):
        classification_map(np.zeros(4), np.zeros(4))
    with pytest.raises(ValueError, match="^video_scores: expected a numeric"):
        classification_map(np.array([[0.5 + 1j, 0.2]]), np.array([[1, 0]]))
    with pytest.raises(ValueError, match="^video_scores: expected a numeric .*, got a complex tensor"):
        classification_map(torch.tensor([[0.5 + 1j, 0.2]]), np.array([[1, 0]]))


# ---------------------------------------------------------------- JSON export


def test_export_detections_json(tmp_path):
    pred = torch.tensor([[0, 1, 25, 50, 0.75], [1, 0, 0, 16, 0.5], [0, 0, 5, 7, 0.25]], dtype=torch.float64)
    data = export_detections_json(pred, ["a", b"b", "c"], ["Alpha", "Beta"], tmp_path / "out.json")
    assert json.loads((tmp_path / "out.json").read_text()) == data
    assert data["version"] == "VERSION 1.3" and data["external_data"] == {}
    assert data["results"]["a"] == [
        {"label": "Beta", "segment": [16.0, 32.0], "score": 0.75},
        {"label": "Alpha", "segment": [3.2, 4.48], "score": 0.25},
    ]
    assert data["results"]["b"] == [{"label": "Alpha", "segment": [0.0, 10.24], "score": 0.5}]
    assert data["results"]["c"] == []
    buffer = io.StringIO()
    export_detections_json(pred, ["a", "b", "c"], ["Alpha", "Beta"], buffer, factor=1.0)
    assert json.loads(buffer.getvalue())["results"]["a"][0]["segment"] == [25.0, 50.0]
    assert export_detections_json(np.zeros((0, 5)), ["a"], ["Alpha"])["results"] == {"a": []}


@pytest.mark.parametrize(
    "pred, names, match",
    [
        ([[2, 0, 0, 1, 0.5]], ["a", "b"], "video index 2"),
        ([[0, 2, 0, 1, 0.5]], ["a", "b"], "class index 2"),
        ([[0, 0, 0, 1, np.inf]], ["a", "b"], "finite scores"),
        ([[0, 0, 0, 1, 0.5]], ["a", "a"], "video_names"),
        ([[0, 0, 0, 1]], ["a", "b"], "predictions"),
        ([[0, 0, 0, 1, 0.5]], [b"\xff", b"b"], r"video_names\[0\]: expected a str or UTF-8 bytes"),
    ],
)
def test_export_bad_inputs(pred, names, match):
    with pytest.raises(ValueError, match=match):
        export_detections_json(pred, names, ["Alpha", "Beta"])


def test_export_refuses_times_that_overflow_to_infinity(tmp_path):
    path = tmp_path / "detections.json"
    with pytest.raises(ValueError, match="predictions: row 0's segment .* not finite in seconds"):
        export_detections_json([[0, 0, 1e300, 1e308, 0.5]], ["a"], ["Alpha"], path, factor=1e-300)
    assert not path.exists()


def test_classification_map_leaves_out_classes_without_positives():
    scores = [[0.9, 0.1], [0.2, 0.8], [0.6, 0.7]]
    labels = [[1, 0], [1, 0], [0, 0]]  # class 1 has no positive video
    # class 0: its positives rank 1st and 3rd, AP (1 + 2/3) / 2; class 1 is not averaged in
    assert classification_map(scores, labels) == pytest.approx((1 + 2 / 3) / 2, abs=EXACT)


def test_to_dict_names_classes_by_their_index_not_their_column():
    # Ground truth only for class 1 of 2: the one AP column is class 1's.
    result = thumos14_detection_map([[0, 1, 0.0, 10.0, 0.9]], ["v"], [[[0.0, 6.4]]], [["B"]], ["A", "B"], factor=25 / 16)
    assert result.classes.tolist() == [1]
    assert set(result.to_dict(class_names=["A", "B"])["ap"]) == {"B"}


def test_thumos14_repeated_class_names_are_an_error():
    with pytest.raises(ValueError, match="class_names"):
        thumos14_detection_map([[0, 1, 10.0, 20.0, 0.9]], ["v"], [[[6.4, 12.8]]], [["A"]], ["A", "A"])


def test_mmsd_detection_map_compares_class_threshold_in_the_scores_dtype():
    # 0.2 - 1e-12 is float32's 0.2: a cast would let the class through.
    cas = np.zeros((30, 2))
    cas[10:20, 1] = 1.0
    args = (["v"], [[[6.4, 12.8]]], [["B"]], ["A", "B"])
    below = mmsd_detection_map([cas], [[0.0, 0.2 - 1e-12]], *args, class_threshold=0.2)
    none = mmsd_detection_map([cas], [[0.0, 0.0]], *args, class_threshold=0.2)
    hit = mmsd_detection_map([cas], [[0.0, 0.9]], *args, class_threshold=0.2)
    assert str(below) == str(none) != str(hit)


@pytest.mark.parametrize(
    "tious, error",
    [
        ([[0.5, 0.6]], ValueError),  # flattened into two thresholds
        (["0.5"], ValueError),  # read as the number 0.5
        ([True], ValueError),  # read as 1.0
        (torch.tensor([True]), ValueError),
        ([0.5, "0.7"], ValueError),
        # bools among numbers: numpy makes [True, 0.5] a float64 [1.0, 0.5], which was taken
        ([True, 0.5], ValueError),
        ((0.3, True), ValueError),
        ([0.5, np.True_], ValueError),
        (np.array([0.5, True], dtype=object), ValueError),
    ],
)
def test_tiou_thresholds_that_only_look_like_numbers_are_refused(tious, error):
    with pytest.raises(error, match="^tiou_thresholds: expected a (1-d )?sequence"):
        detection_map([[0, 0, 0, 1, 0.5]], [[0, 0, 0, 1]], tious)


@pytest.mark.parametrize("tious", [torch.tensor([0.5, 0.7], dtype=torch.bfloat16), np.array([0.5, 0.7], np.float32), 0.5,
                                   torch.tensor([0.5], requires_grad=True)])
def test_tiou_thresholds_as_tensors_arrays_and_a_number(tious):
    result = detection_map([[0, 0, 0, 1, 0.5]], [[0, 0, 0, 1]], tious)
    assert result.tious.dtype == np.float64 and result.map.tolist() == [1.0] * result.tious.size


def test_export_refuses_a_bad_version_or_a_binary_file_before_writing(tmp_path):
    path = tmp_path / "detections.json"
    path.write_text("kept")
    with pytest.raises(TypeError, match="^version: expected a str, got set"):
        export_detections_json([[0, 0, 0, 1, 0.5]], ["a"], ["Alpha"], path, version={1})
    assert path.read_text() == "kept"
    with open(path, "wb") as f, pytest.raises(TypeError, match="^file: expected a text file object.*'wb'"):
        export_detections_json([[0, 0, 0, 1, 0.5]], ["a"], ["Alpha"], f)
    with pytest.raises(TypeError, match="^file: expected None, a path or a text file object, got int"):
        export_detections_json([[0, 0, 0, 1, 0.5]], ["a"], ["Alpha"], 3)


@pytest.mark.parametrize("names, error", [(["a", "b"], ValueError), ("abcd", TypeError)])
def test_to_dict_refuses_class_names_that_miss_a_class(names, error):
    result = detection_map([[0, 3, 0, 1, 0.5]], [[0, 1, 0, 1], [0, 3, 0, 1]])
    with pytest.raises(error, match="^class_names: "):
        result.to_dict(class_names=names)
    assert set(result.to_dict(class_names={1: "one", 3: "three"})["ap"]) == {"one", "three"}


def test_to_dict_decodes_bytes_class_names_as_the_protocol_does():
    # W-TALC's classlist.npy holds bytes: the keys were "b'Beta'".
    classes = np.array([c.encode() for c in CLASSES])
    result = thumos14_detection_map([[0, 1, 0, 10, 1.0]], np.array([b"v"]), [[[0.0, 6.4]]], [[b"Beta"]], classes)
    assert list(result.to_dict(class_names=classes)["ap"]) == ["Beta"]
    assert list(result.to_dict(class_names=list(classes))["ap"]) == ["Beta"]
    with pytest.raises(ValueError, match=r"^class_names\[1\]: expected a str or UTF-8 bytes"):
        result.to_dict(class_names=[b"A", b"\xff"])


def _per_video(rows, **like):
    """Rows as a list of one tensor each, as an evaluation loop collects them (here requiring grad)."""
    return [torch.tensor(row, **like).requires_grad_(like.get("dtype", torch.float32).is_floating_point) for row in rows]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_lists_of_tensors_that_require_grad_are_read_like_arrays(dtype):
    # numpy cannot read a tensor that requires grad (or a bfloat16 one): each was a raw
    # torch error naming no argument, or "expected a numeric array".
    scores, labels = [[0.875, 0.125], [0.25, 0.75], [0.5, 0.625]], [[1, 0], [1, 1], [0, 1]]
    assert classification_map(_per_video(scores, dtype=dtype), labels) == classification_map(scores, labels)
    pred, gt = [[0, 1, 0, 10, 0.5], [0, 0, 2, 8, 0.25]], [[0, 1, 0, 8], [0, 0, 2, 6]]
    np.testing.assert_array_equal(detection_map(_per_video(pred, dtype=dtype), _per_video(gt, dtype=dtype)).ap,
                                  detection_map(pred, gt).ap)
    args = (["v"], [[[0.0, 6.4]]], [["Beta"]], CLASSES)
    assert thumos14_detection_map(_per_video(pred, dtype=dtype), *args).average == thumos14_detection_map(pred, *args).average
    assert export_detections_json(_per_video(pred, dtype=dtype), ["v"], CLASSES) == export_detections_json(pred, ["v"], CLASSES)
    # The ground truth of a video as one tensor, or as a list of tensor rows.
    for segments in (torch.tensor([[0.0, 6.4]], dtype=dtype, requires_grad=True), [torch.tensor([0.0, 6.4], dtype=dtype, requires_grad=True)]):
        expected = thumos14_detection_map(pred, ["v"], [[[0.0, float(torch.tensor(6.4, dtype=dtype))]]], [["Beta"]], CLASSES)
        assert thumos14_detection_map(pred, ["v"], [segments], [["Beta"]], CLASSES).average == expected.average


def test_mmsd_detection_map_stacks_video_scores_given_as_tensors_in_their_dtype():
    cas = np.zeros((30, 2), np.float32)
    cas[10:20, 1] = 1.0
    args = (["v"], [[[6.4, 12.8]]], [["B"]], ["A", "B"])
    # bfloat16's 0.35 is 0.349609375: the class passes the threshold 0.35 only if compared in
    # bfloat16, as a [V, C] bfloat16 tensor is (a float32 copy would leave it out).
    score = torch.tensor([0.0, 0.35], dtype=torch.bfloat16)
    as_list = mmsd_detection_map([cas], [score.clone().requires_grad_()], *args, class_threshold=0.35)
    as_tensor = mmsd_detection_map([cas], score[None], *args, class_threshold=0.35)
    as_float32 = mmsd_detection_map([cas], score[None].float(), *args, class_threshold=0.35)
    assert as_list.average == as_tensor.average == 1.0 and as_float32.average == 0.0
    with pytest.raises(ValueError, match=r"^video_scores: expected a \[V, C\] array of numbers"):
        mmsd_detection_map([cas], [torch.zeros(1), torch.zeros(2)], *args)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: detection_map([["0", "1", "11", "20", "0.9"]], [[0, 1, 10, 20]]), "^predictions: expected numeric rows"),
        (lambda: detection_map([[0, 1, 10, 20, 0.9]], np.array([["0", "1", "10", "20"]])), "^ground_truth: expected numeric rows"),
        (lambda: detection_map([[0, 1, 10, 20, "0.9"]], [[0, 1, 10, 20]]), "^predictions: expected numeric rows"),
        (lambda: classification_map([[0.9, 0.1], [0.2, 0.8]], [["1", "0"], ["0", "1"]]), r"^labels: expected a numeric \[V, C\] array"),
        (lambda: classification_map(np.array([[0.9, 0.1]], dtype=object).astype(str), [[1, 0]]), "^video_scores: "),
        (lambda: classification_map(np.array([[0.9, "0.1"]], dtype=object), [[1, 0]]), "^video_scores: "),
        (lambda: classification_map([[0.9, 0.1]], np.array([[1, b"0"]], dtype=object)), "^labels: "),
        (lambda: thumos14_detection_map([[0, 0, 0, 2, 0.5]], ["v"], [[["0.0", "6.4"]]], [["Alpha"]], CLASSES),
         r"^gt_segments\[0\]: expected finite \[start, end\] seconds with end >= start, got \[\['0.0', '6.4'\]\]$"),
        (lambda: thumos14_detection_map([[0, 0, 0, 2, 0.5]], ["v"], [np.array([["0.0", "6.4"]])], [["Alpha"]], CLASSES),
         r"^gt_segments\[0\]: expected finite"),
    ],
)
def test_numbers_written_as_strings_are_refused(call, match):
    # numpy reads "0.9" as 0.9: these were scored as if given as numbers.
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    "call",
    [
        lambda dtype: classification_map([torch.tensor([0.5, 0.25]).to(dtype), [0.2, 0.8]], [[1, 0], [0, 1]]),
        lambda dtype: detection_map([torch.tensor([0.0, 0.0, 0.0, 1.0, 0.5]).to(dtype)], [[0, 0, 0, 1]]),
    ],
)
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex32, torch.float8_e4m3fn])
@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_tensors_numpy_cannot_take_are_refused_by_name(call, dtype):
    # complex: numpy would drop the imaginary part; complex32 and float8 have no numpy dtype
    # (a raw torch TypeError naming no argument).
    with pytest.raises(ValueError, match="^(video_scores: expected a numeric|predictions: expected numeric)"):
        call(dtype)


def test_flat_ground_truth_hints_at_the_nesting_only_for_a_valid_pair():
    def message(segments):
        with pytest.raises(ValueError) as info:
            thumos14_detection_map([[0, 0, 0, 2, 0.5]], ["v"], [segments], [["Alpha"] * len(segments)], CLASSES)
        return str(info.value)

    assert message([0.0, 1.0, 2.0, 3.0]) == "gt_segments[0]: expected a sequence of [start, end] pairs, got the flat sequence [0.0, 1.0, 2.0, 3.0]"
    assert message([6.4, 0.0]) == "gt_segments[0]: expected a sequence of [start, end] pairs, got the flat sequence [6.4, 0.0]"
    assert message([torch.tensor(0.0), torch.tensor(0.5)]).endswith("(a video with one segment holds [[0.0, 0.5]])")


def test_mmsd_detection_map_takes_cas_as_numpy_arrays():
    # W-TALC keeps per-video arrays in a numpy object array; a padded batch may be one array.
    # Both were refused ("expected a [V, T, C] tensor or a list").
    first = np.zeros((30, 2), np.float32)
    first[10:20, 1] = 1.0
    second = np.zeros((12, 2), np.float32)
    second[0:5, 0] = 1.0
    args = ([[0.0, 0.9], [0.9, 0.0]], ["v", "w"], [[[6.4, 12.8]], [[0.0, 3.2]]], [["B"], ["A"]], ["A", "B"])
    want = mmsd_detection_map([first, second], *args)
    per_video = np.empty(2, dtype=object)
    per_video[0], per_video[1] = first, second
    padded = np.zeros((2, 30, 2), np.float32)
    padded[0], padded[1, :12] = first, second
    for cas, lengths in ((per_video, None), (padded, [30, 12])):
        got = mmsd_detection_map(cas, *args, lengths=lengths)
        np.testing.assert_array_equal(got.ap, want.ap)
    assert want.average == 1.0
    with pytest.raises(TypeError, match="^cas: expected a numeric array or an object array of per-video arrays, got <U1$"):
        mmsd_detection_map(np.array(["x"]), *args)
    with pytest.raises(ValueError, match="^lengths: only for a padded cas tensor"):
        mmsd_detection_map(per_video, *args, lengths=[30, 12])
    # Any byte order, strides, or a read-only (memory-mapped) array: read from a copy.
    swapped = padded.astype(">f4")
    reversed_view = np.ascontiguousarray(padded[:, :, ::-1])[:, :, ::-1]
    read_only = padded.copy()
    read_only.setflags(write=False)
    for cas in (swapped, reversed_view, read_only):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torch warns of a tensor made from a read-only array
            np.testing.assert_array_equal(mmsd_detection_map(cas, *args, lengths=[30, 12]).ap, want.ap)
    with pytest.raises(TypeError, match=r"^cas: expected a 1-d object array of per-video \[T_i, C\] arrays, got shape \(\)$"):
        mmsd_detection_map(np.array(None, dtype=object), *args)


def test_a_padded_cas_with_fewer_videos_than_names_is_refused():
    # One padded sequence for two named videos: the second had no cas (and no error).
    with pytest.raises(ValueError, match=r"^cas: expected one sequence per video \(2 video_names\), got 1$"):
        mmsd_detection_map(torch.zeros(1, 8, 2), [[1.0, 0.0], [1.0, 0.0]], ["v1", "v2"], [[], []], [[], []], ["A", "B"])


def test_an_ambiguous_segment_of_no_length_is_read(tmp_path):
    # end == start is a segment (of zero length); only end < start is refused.
    path = tmp_path / "Ambiguous_test.txt"
    path.write_text("v  5.0 5.0\nw  1.0 2.5\n")
    assert read_ambiguous(path) == [("v", 5.0, 5.0), ("w", 1.0, 2.5)]
