"""Scoring temporal detections.

- ``detection_map``: mAP at tIoU thresholds with ActivityNet semantics (any time unit).
- ``thumos14_detection_map``: MMSD's THUMOS14 protocol (``getLocMAP``) on proposals in snippets.
- ``mmsd_detection_map``: class activation sequences -> ``mmsd_proposals`` -> the THUMOS14 protocol.
- ``classification_map``: MMSD's (W-TALC's) video classification mAP.
- ``export_detections_json``: detections as ActivityNet-style JSON, in seconds.
- ``read_ambiguous``: the Ambiguous_test.txt list of the W-TALC layout.

All AP values are fractions in [0, 1]; multiply by 100 for the percentages MMSD prints.
Every tIoU threshold is evaluated in one pass: predictions are ranked once per
class, and the greedy matching runs in rounds (the r-th best prediction of
every (class, video) at once, for all thresholds at once), which is exactly the
sequential greedy because only predictions of the same class and video compete
for the same ground truth.
"""

import collections.abc
import dataclasses
import json
import math
import os

import numpy as np
import torch

from . import _checks
from .localize import MMSD_THRESHOLDS, _pad, mmsd_proposals

DEFAULT_TIOUS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
#: I3D snippets per second of the W-TALC features: 25 fps, 16 frames a snippet.
THUMOS14_FACTOR = 25.0 / 16.0

PREDICTION_COLUMNS = ("video", "class", "start", "end", "score")
GROUND_TRUTH_COLUMNS = ("video", "class", "start", "end")


@dataclasses.dataclass(frozen=True, eq=False)
class DetectionMAP:
    """Result of ``detection_map`` and the THUMOS14 protocol.

    Attributes:
        tious: float64 [n_tiou], the thresholds.
        classes: int64 [n_class], the classes present in the ground truth, ascending
            (the ones the mean runs over).
        ap: float64 [n_tiou, n_class] average precision in [0, 1].
        map: float64 [n_tiou], mean AP over ``classes`` per threshold.
        average: float, mean of ``map`` over the thresholds.
        num_ground_truth: int64 [n_class] ground-truth segments per class.
        num_predictions: int64 [n_class] predictions per class that were scored.
    """

    tious: np.ndarray
    classes: np.ndarray
    ap: np.ndarray
    map: np.ndarray
    average: float
    num_ground_truth: np.ndarray
    num_predictions: np.ndarray

    def to_dict(self, class_names=None, percent=True):
        """JSON-ready dict: ``map`` {tIoU: value}, ``average_map``, ``ap`` {class: {tIoU: value}},
        and ``percent`` (whether the values are percentages: ``percent=True``, the default, or
        fractions). ``class_names``: names for the ``ap`` keys, indexed by class id (default: the
        ids as strings; bytes are decoded as UTF-8, as W-TALC's ``classlist.npy`` holds them); a
        class without a name is a ValueError naming ``class_names``."""
        scale = 100.0 if percent else 1.0
        keys = _tiou_keys(self.tious)
        if class_names is None:
            names = [str(int(c)) for c in self.classes]
        else:
            if isinstance(class_names, (str, bytes)):
                raise TypeError(f"class_names: expected a sequence of names, got {type(class_names).__name__}")
            names = []
            for c in self.classes.tolist():
                try:
                    name = class_names[c]
                except (IndexError, KeyError):
                    raise ValueError(f"class_names: class {c} has no name (got {len(class_names)} names)") from None
                if isinstance(name, (bytes, np.bytes_)):  # W-TALC's classlist.npy holds bytes
                    try:
                        name = _name(name)
                    except UnicodeDecodeError:
                        raise ValueError(f"class_names[{c}]: expected a str or UTF-8 bytes, got {name!r}") from None
                names.append(str(name))
        return {
            "map": {k: float(v) * scale for k, v in zip(keys, self.map)},
            "average_map": float(self.average) * scale,
            "ap": {n: {k: float(v) * scale for k, v in zip(keys, self.ap[:, j])} for j, n in enumerate(names)},
            "percent": bool(percent),
        }

    def __str__(self):
        keys = _tiou_keys(self.tious)
        width = max([6] + [len(k) for k in keys])
        head = " ".join(f"{k:>{width}}" for k in keys)
        values = " ".join(f"{100 * m:{width}.2f}" for m in self.map)
        return f"tIoU {head}    AVG\nmAP  {values} {100 * self.average:6.2f}"


def _tiou_keys(tious):
    """The thresholds as short strings ("0.5"), with as many digits as keep distinct thresholds
    apart (6, else 10, else 17, which tells any two float64 apart)."""
    for digits in (6, 10, 17):
        keys = [f"{t:.{digits}g}" for t in tious]
        if len(set(keys)) == len(set(tious.tolist())):
            return keys
    return keys


def detection_map(predictions, ground_truth, tiou_thresholds=DEFAULT_TIOUS):
    """Mean average precision of temporal detections at each tIoU threshold (ActivityNet semantics).

    Per class, predictions are ranked by descending score (ties: input order);
    each in turn takes the not-yet-matched ground-truth segment of the same
    video and class with the highest IoU, provided that IoU >= t (ties: the
    earlier ground-truth row); it is a true positive if it took one. AP is the
    VOC-interpolated area under the precision/recall curve; mAP is the mean over
    the classes present in the ground truth. A class with no predictions has AP 0;
    predictions of classes absent from the ground truth are ignored; predictions
    on videos without ground truth are false positives.

    IoU is continuous: ``inter = max(0, min(e1, e2) - max(s1, s2))``,
    ``union = (e1 - s1) + (e2 - s2) - inter``, IoU 0 when ``union == 0``.

    Where ActivityNet's ``compute_average_precision_detection`` differs: only
    in ties and empty segments. It ranks by ``argsort()[::-1]`` of the scores and
    tries ground truth by ``argsort()[::-1]`` of the IoUs, which puts tied scores
    in an order numpy's unstable sort leaves open (reverse input order on small
    arrays) and tries the later of tied ground-truth rows first; here both take
    the earlier row, as MMSD's ``getLocMAP`` does. Its IoU of two zero-length
    segments is 0 / 0, a NaN that it counts as a match; here it is 0. Without
    ties, the two give the same APs (tests/test_evaluate.py follows its steps).

    Args:
        predictions: [P, 5] rows (video, class, start, end, score), numpy array,
            tensor or nested lists (of numbers, arrays or tensors, which may require
            grad or be on a GPU; numbers written as strings are refused). video and
            class are integers in [0, 2**53) (any ids: they are matched by value),
            ``end >= start``, scores not NaN.
            P == 0 (any empty input) is allowed: every AP is 0.
        ground_truth: [G, 4] rows (video, class, start, end), same time unit;
            at least one row.
        tiou_thresholds: non-empty sequence of distinct thresholds in (0, 1].

    Returns:
        DetectionMAP (tious, classes, ap [n_tiou, n_class], map [n_tiou], average, ...).

    Raises:
        ValueError naming the argument: wrong number of columns, non-integral or
        negative ids, end < start, NaN, no ground truth, thresholds outside (0, 1].
        TypeError naming the argument: ``tiou_thresholds`` that is not a sequence of numbers (None, a str).

    Example::

        >>> ground_truth = [[0, 1, 10.0, 20.0], [1, 1, 5.0, 9.0]]    # video, class, start, end
        >>> predictions = [[0, 1, 11.0, 20.0, 0.9],                   # IoU 0.9
        ...                [1, 1, 30.0, 40.0, 0.8],                   # no ground truth there
        ...                [1, 1, 5.0, 8.0, 0.3]]                     # IoU 0.75
        >>> result = mmsd_ext.detection_map(predictions, ground_truth, tiou_thresholds=(0.5, 0.8))
        >>> print(result)                                  # mAP per tIoU and their mean, in %
        tIoU    0.5    0.8    AVG
        mAP   83.33  50.00  66.67
        >>> result.map.tolist(), result.average            # the same, as fractions
        ([0.8333333333333333, 0.5], 0.6666666666666666)
    """
    pred = _rows("predictions", predictions, PREDICTION_COLUMNS)
    gt = _rows("ground_truth", ground_truth, GROUND_TRUTH_COLUMNS)
    if len(gt) == 0:
        raise ValueError("ground_truth: expected at least one row, got none (mAP is undefined without ground truth)")
    return _detection_map(pred, gt, _tious(tiou_thresholds))


def thumos14_detection_map(
    predictions,
    video_names,
    gt_segments,
    gt_labels,
    class_names,
    *,
    ambiguous=None,
    tiou_thresholds=DEFAULT_TIOUS,
    factor=THUMOS14_FACTOR,
    zero_map_if_class_empty=False,
):
    """MMSD's THUMOS14 evaluation (``getLocMAP``) of proposals in snippets.

    The protocol, step by step:

    1. Ground truth in seconds becomes snippets ``round(sec * factor)``, rounding
       half to even like Python's ``round``; IoU is then computed on integer
       snippet ranges ``[start, end)`` (the continuous IoU of integer endpoints
       equals MMSD's set IoU).
    2. Videos without ground-truth segments are left out with their predictions
       (MMSD evaluates only annotated videos).
    3. Prediction boundaries are truncated toward zero (``int``).
    4. A prediction is dropped if its snippet range shares a snippet with an
       ambiguous segment of its video (``round(sec * factor)`` as in 1).
    5. ``detection_map`` on what remains, over the classes present in the ground truth.

    With ``zero_map_if_class_empty=True``, MMSD's quirk: if any ground-truth class
    has no prediction left after step 4, every mAP (and the average) is 0; ``ap``
    keeps the per-class values. Off by default.

    Known differences from MMSD's code: ties in score are ranked by input order
    (numpy's default sort, which MMSD uses, leaves their order unspecified; for
    the proposals' own tie rule see ``mmsd_proposals``); outside THUMOS14's
    normal use, ``getLocMAP`` indexes its per-class lists by class index
    although ``getActLoc`` builds them in the order of the sorted class names
    present in the ground truth -- the two agree when every class has ground
    truth and ``class_names`` is sorted, as for THUMOS14 -- here each class is
    simply scored with its own predictions.

    Args:
        predictions: [P, 5] rows (video, class, start, end, score) in snippets, video an
            index into ``video_names``, class an index into ``class_names``
            (e.g. the output of ``mmsd_proposals``).
        video_names: V names (str or bytes), the evaluated videos in row order
            (for THUMOS14: the test subset).
        gt_segments: V per-video sequences of [start, end] in seconds (W-TALC's
            ``segments.npy``, restricted to the evaluated videos).
        gt_labels: V per-video sequences of class names, one per segment (``labels.npy``).
        class_names: C class names (``classlist.npy``); str or bytes.
        ambiguous: None, a path (str, bytes or PathLike) to ``Ambiguous_test.txt``, or (name, start, end)
            entries in seconds; entries of other videos are ignored.
        tiou_thresholds: as in ``detection_map``.
        factor: snippets per second (25/16 for the I3D features of W-TALC; 10/4 for UNT).
        zero_map_if_class_empty: reproduce MMSD's all-zero mAP when a class has no predictions.

    Returns:
        DetectionMAP; ``classes`` index into ``class_names``.

    Raises:
        ValueError naming the argument: lengths of the per-video lists that
        disagree, unknown class names, out-of-range video or class indices,
        segments with end < start, no ground truth at all, a malformed ambiguous
        file, a ``factor`` that takes a ground-truth time past float64's range.
        TypeError naming the entry: a name that is not str or bytes, a video's
        segments or labels that are not a sequence.
        OSError (FileNotFoundError, ...) for an ambiguous path that cannot be read.

    Example (for real data: the rows of ``mmsd_proposals``, the W-TALC files of the
    test subset, and ``ambiguous=root + "/Ambiguous_test.txt"``)::

        >>> classlist = ["BaseballPitch", "HighJump"]
        >>> names = ["video_test_0000004", "video_test_0000006"]
        >>> segments = [[[0.64, 8.0]], [[3.2, 9.6], [20.0, 26.4]]]          # seconds
        >>> labels = [["HighJump"], ["BaseballPitch", "BaseballPitch"]]
        >>> rows = [[0, 1, 1.0, 12.5, 0.9],     # video, class, start, end (snippets), score
        ...         [1, 0, 9.0, 15.0, 0.8],     # IoU 0.6 with 3.2-9.6 s (snippets 5-15)
        ...         [1, 0, 50.0, 60.0, 0.75],   # no ground truth there
        ...         [1, 0, 31.0, 41.0, 0.7]]    # 20-26.4 s exactly
        >>> print(mmsd_ext.thumos14_detection_map(rows, names, segments, labels, classlist))
        tIoU    0.1    0.2    0.3    0.4    0.5    0.6    0.7    AVG
        mAP   91.67  91.67  91.67  91.67  91.67  91.67  58.33  86.90
    """
    names = _names("video_names", video_names)
    classes = _names("class_names", class_names)
    if len(set(classes)) != len(classes):
        raise ValueError("class_names: expected distinct names, got duplicates")
    factor = _positive("factor", factor)
    tious = _tious(tiou_thresholds)
    V, C = len(names), len(classes)
    for name, value in (("gt_segments", gt_segments), ("gt_labels", gt_labels)):
        if isinstance(value, (str, bytes)) or (hasattr(value, "__len__") and not _is_sequence(value)):
            raise TypeError(f"{name}: expected a sequence with one entry per video, got {type(value).__name__}")
        if not hasattr(value, "__len__") or len(value) != V:
            got = len(value) if hasattr(value, "__len__") else type(value).__name__
            raise ValueError(f"{name}: expected one entry per video ({V} video_names), got {got}")
    gt = _thumos_ground_truth(gt_segments, gt_labels, classes, factor)
    if len(gt) == 0:
        raise ValueError("gt_segments: expected at least one ground-truth segment, got none")

    pred = _rows("predictions", predictions, PREDICTION_COLUMNS)
    _check_index_range("predictions", pred[:, 0], V, "video", "video_names")
    _check_index_range("predictions", pred[:, 1], C, "class", "class_names")
    has_gt = np.zeros(V, dtype=bool)
    has_gt[gt[:, 0].astype(np.int64)] = True
    pred = pred[has_gt[pred[:, 0].astype(np.int64)]]
    pred[:, 2:4] = np.trunc(pred[:, 2:4])

    entries = read_ambiguous(ambiguous) if isinstance(ambiguous, (str, bytes, os.PathLike)) else _ambiguous_entries(ambiguous)
    if entries and len(pred):
        pred = pred[~_touches_ambiguous(pred, entries, names, factor)]

    result = _detection_map(pred, gt, tious)
    if zero_map_if_class_empty and bool((result.num_predictions == 0).any()):
        result = dataclasses.replace(result, map=np.zeros_like(result.map), average=0.0)
    return result


def mmsd_detection_map(
    cas,
    video_scores,
    video_names,
    gt_segments,
    gt_labels,
    class_names,
    *,
    lengths=None,
    ambiguous=None,
    tiou_thresholds=DEFAULT_TIOUS,
    factor=THUMOS14_FACTOR,
    zero_map_if_class_empty=False,
    thresholds=MMSD_THRESHOLDS,
    class_threshold=0.2,
    min_len=2,
    outer_ratio=0.25,
    nms_threshold=0.4,
    backend=None,
):
    """MMSD's whole localization evaluation: ``mmsd_proposals`` then ``thumos14_detection_map``.

    Args:
        cas: padded [V, T, C] tensor or array (with ``lengths``), or a list (or numpy
            object array) of V per-video [T_i, C] arrays or tensors. C must equal
            ``len(class_names)``: drop the background column first.
        video_scores: [V, C] tensor or array of video-level class scores, or a list of V
            [C] tensors (stacked in their dtype where they share one; bfloat16 otherwise
            read as float32), arrays or lists.
        video_names, gt_segments, gt_labels, class_names, ambiguous, tiou_thresholds,
            factor, zero_map_if_class_empty: as in ``thumos14_detection_map``.
        lengths: [V] valid lengths of a padded ``cas`` (not allowed with a list).
        thresholds, class_threshold, min_len, outer_ratio, nms_threshold, backend:
            as in ``mmsd_proposals``.

    Returns:
        DetectionMAP. To also keep (or export) the proposals, call ``mmsd_proposals``
        and ``thumos14_detection_map`` yourself: this function is exactly those two calls.

    Example (one video of 30 snippets, class "B" in snippets 10-19, that is 6.4-12.8 s;
    for real data, the W-TALC files of the test subset as in ``thumos14_detection_map``)::

        >>> cas = np.zeros((30, 2), np.float32); cas[10:20, 1] = 1.0          # [T, C]
        >>> result = mmsd_ext.mmsd_detection_map([cas], [[0.0, 0.9]], ["v"], [[[6.4, 12.8]]],
        ...                                      [["B"]], ["A", "B"])
        >>> print(result)                                  # mAP per tIoU and their mean, in %
        tIoU    0.1    0.2    0.3    0.4    0.5    0.6    0.7    AVG
        mAP  100.00 100.00 100.00 100.00 100.00 100.00 100.00 100.00
    """
    num_videos = len(_names("video_names", video_names))
    num_classes = len(_names("class_names", class_names))
    if isinstance(cas, np.ndarray) and cas.dtype != object:
        if cas.dtype.kind not in "biuf":
            raise TypeError(f"cas: expected a numeric array or an object array of per-video arrays, got {cas.dtype}")
        # A padded batch, as a tensor: a copy, so that any byte order, strides or a read-only
        # (memory-mapped) array will do.
        cas = torch.from_numpy(np.array(cas, dtype=cas.dtype.newbyteorder("="), order="C"))
    if isinstance(cas, np.ndarray) and cas.ndim != 1:
        raise TypeError(f"cas: expected a 1-d object array of per-video [T_i, C] arrays, got shape {cas.shape}")
    if isinstance(cas, (list, tuple, np.ndarray)):  # (an object array: W-TALC's per-video arrays)
        if lengths is not None:
            raise ValueError("lengths: only for a padded cas tensor; a list of sequences carries its own lengths")
        cas, lengths = _pad(cas, None, "cas")
    if not isinstance(cas, torch.Tensor):
        raise TypeError(f"cas: expected a [V, T, C] tensor or array, or a list or object array of [T_i, C] arrays, "
                        f"got {type(cas).__name__}")
    if cas.dim() == 3 and cas.shape[2] != num_classes:
        raise ValueError(
            f"cas: expected C = len(class_names) = {num_classes} class columns, got {cas.shape[2]} "
            "(drop the background column)"
        )
    if cas.dim() == 3 and cas.shape[0] != num_videos:
        raise ValueError(f"cas: expected one sequence per video ({num_videos} video_names), got {cas.shape[0]}")
    if not isinstance(video_scores, torch.Tensor):
        video_scores = _numeric_tensor("video_scores", video_scores, "a [V, C] array of numbers")
    video_scores = video_scores.to(cas.device)
    if isinstance(lengths, torch.Tensor):
        lengths = lengths.to(cas.device)
    rows = mmsd_proposals(
        cas,
        video_scores,
        lengths,
        thresholds=thresholds,
        class_threshold=class_threshold,
        min_len=min_len,
        outer_ratio=outer_ratio,
        nms_threshold=nms_threshold,
        backend=backend,
    )
    return thumos14_detection_map(
        rows,
        video_names,
        gt_segments,
        gt_labels,
        class_names,
        ambiguous=ambiguous,
        tiou_thresholds=tiou_thresholds,
        factor=factor,
        zero_map_if_class_empty=zero_map_if_class_empty,
    )


def classification_map(video_scores, labels):
    """Video classification mAP as MMSD computes it (W-TALC's ``getClassificationMAP``).

    Per class: videos ranked by descending score (ties: input order);
    AP = sum of the precision at each positive video / number of positives
    (non-interpolated). The result is the mean over the classes that have at
    least one positive video, in [0, 1] (MMSD prints 100x). Computed in float64
    (MMSD's float32 cumulative sums differ by ~1e-7). MMSD's code would return
    NaN when a class has no positive video; such classes are left out here.

    Args:
        video_scores: [V, C] scores (tensor or array), not NaN.
        labels: [V, C] multi-hot labels, values 0 or 1 (bool allowed).

    Returns:
        float.

    Raises:
        ValueError naming the argument: shapes that differ or are not 2-d, empty
        inputs, NaN scores, labels other than 0/1, no positive label at all.

    Example (class 0: its positives ranked 1st and 3rd, AP (1 + 2/3) / 2; class 1: AP 1)::

        >>> scores = [[0.9, 0.1], [0.2, 0.8], [0.6, 0.7]]             # [V, C]
        >>> labels = [[1, 0], [1, 1], [0, 1]]
        >>> round(mmsd_ext.classification_map(scores, labels), 4)
        0.9167
    """
    scores = _matrix("video_scores", video_scores)
    labels = _matrix("labels", labels)
    if scores.shape != labels.shape:
        raise ValueError(f"labels: expected the shape of video_scores {scores.shape}, got {labels.shape}")
    if scores.size == 0:
        raise ValueError(f"video_scores: expected at least one video and one class, got shape {scores.shape}")
    if np.isnan(scores).any():
        raise ValueError("video_scores: NaN values")
    if not np.isin(labels, (0.0, 1.0)).all():
        raise ValueError("labels: expected values 0 or 1")
    positives = labels.sum(axis=0)
    present = positives > 0
    if not present.any():
        raise ValueError("labels: no class has a positive video; classification mAP is undefined")
    order = np.argsort(-scores, axis=0, kind="stable")
    hits = np.take_along_axis(labels, order, axis=0)
    precision = np.cumsum(hits, axis=0) / np.arange(1, len(hits) + 1)[:, None]
    ap = (precision * hits).sum(axis=0)[present] / positives[present]
    return float(ap.mean())


def export_detections_json(predictions, video_names, class_names, file=None, *, factor=THUMOS14_FACTOR, version="VERSION 1.3"):
    """Write detections in the ActivityNet result format, with times in seconds.

    ``{"version": ..., "results": {video: [{"label", "segment": [start, end], "score"}]},
    "external_data": {}}``; every video of ``video_names`` gets an entry (empty if it has
    no detection), detections keep the row order of ``predictions``.

    Args:
        predictions: [P, 5] rows (video index, class index, start, end, score) in snippets.
        video_names: V distinct names (str or bytes).
        class_names: C names (str or bytes).
        file: None, a path (str or os.PathLike), or a text file object.
        factor: snippets per second: seconds = snippets / factor (25/16 for W-TALC's I3D).
        version: the "version" string.

    Returns:
        The dict that was written.

    Raises:
        ValueError naming the argument: bad rows, indices out of range, non-finite
        scores (JSON has no infinities), duplicate video names.
        TypeError naming the argument: a ``version`` that is not a str, a ``file``
        that is not a path or a text file object. The JSON text is made in full
        before ``file`` is opened, so an error never leaves a cut-off file.

    Example (pass ``file="detections.json"`` to write it)::

        >>> mmsd_ext.export_detections_json([[0, 1, 10.0, 20.0, 0.9]], ["video_test_0000004"],
        ...                                 ["BaseballPitch", "HighJump"])  # doctest: +NORMALIZE_WHITESPACE
        {'version': 'VERSION 1.3', 'results': {'video_test_0000004': [{'label': 'HighJump',
         'segment': [6.4, 12.8], 'score': 0.9}]}, 'external_data': {}}
    """
    if not isinstance(version, str):
        raise TypeError(f"version: expected a str, got {type(version).__name__}")
    if not (file is None or isinstance(file, (str, os.PathLike)) or hasattr(file, "write")):
        raise TypeError(f"file: expected None, a path or a text file object, got {type(file).__name__}")
    pred = _rows("predictions", predictions, PREDICTION_COLUMNS)
    names = _names("video_names", video_names)
    classes = _names("class_names", class_names)
    if len(set(names)) != len(names):
        raise ValueError("video_names: expected distinct names, got duplicates")
    factor = _positive("factor", factor)
    _check_index_range("predictions", pred[:, 0], len(names), "video", "video_names")
    _check_index_range("predictions", pred[:, 1], len(classes), "class", "class_names")
    if not np.isfinite(pred[:, 4]).all():
        raise ValueError("predictions: expected finite scores for JSON export")
    with np.errstate(over="ignore"):  # checked just below
        seconds = pred[:, 2:4] / factor
    if not np.isfinite(seconds).all():
        i = int(np.flatnonzero(~np.isfinite(seconds).all(axis=1))[0])
        raise ValueError(f"predictions: row {i}'s segment ({pred[i, 2]}, {pred[i, 3]}) / factor {factor} is not finite "
                         "in seconds (JSON has no infinities)")
    results = {name: [] for name in names}
    for (v, c, _s, _e, score), (s, e) in zip(pred.tolist(), seconds.tolist()):
        results[names[int(v)]].append({"label": classes[int(c)], "segment": [s, e], "score": score})
    data = {"version": version, "results": results, "external_data": {}}
    if file is None:
        return data
    # Made in full before anything is opened: a failure cannot leave a cut-off file.
    text = json.dumps(data)
    if isinstance(file, (str, os.PathLike)):
        with open(file, "w") as f:
            f.write(text)
    else:
        try:
            file.write(text)
        except TypeError:  # a binary file object refuses str before writing anything
            raise TypeError(f"file: expected a text file object, got {type(file).__name__} "
                            "(open it with 'w', not 'wb')") from None
    return data


def read_ambiguous(path):
    """Parse W-TALC's Ambiguous_test.txt: one ``name  start end`` (seconds) per line.

    Any whitespace separates the fields (MMSD splits on single spaces, which
    needs the file's two spaces after the name); blank lines are skipped. Lines
    are UTF-8 (a byte order mark at the start is skipped), or else latin-1 (as
    the training data reads names written by Python 2 tools).

    Returns:
        list of (name, start, end).

    Raises:
        ValueError naming the file and line for a line that is not name, start, end
        with finite start <= end;
        OSError (FileNotFoundError, ...) for a file that cannot be read.
    """
    entries = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte order mark (Windows editors) would join the first name
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                line = raw.decode("latin-1")  # decodes any byte
            fields = line.split()
            if not fields:
                continue
            expected = "'name start end'"
            try:
                if len(fields) != 3:
                    raise ValueError
                start, end = float(fields[1]), float(fields[2])
                if not (math.isfinite(start) and math.isfinite(end)):
                    raise ValueError
                if end < start:
                    expected = "'name start end' with end >= start"
                    raise ValueError
                entries.append((fields[0], start, end))
            except ValueError:
                raise ValueError(f"ambiguous: {os.fsdecode(path)} line {number}: expected {expected}, got {line.strip()!r}") from None
    return entries


# --------------------------------------------------------------------------- core


def _detection_map(pred, gt, tious):
    classes = np.unique(gt[:, 1]).astype(np.int64)
    n_tiou, n_class = len(tious), len(classes)
    gt_class = np.searchsorted(classes, gt[:, 1])

    position = np.minimum(np.searchsorted(classes, pred[:, 1]), n_class - 1)
    scored = classes[position] == pred[:, 1]
    pred, pred_class = pred[scored], position[scored]
    # Class-major, then descending score; lexsort is stable, so ties keep input order.
    order = np.lexsort((-pred[:, 4], pred_class))
    pred, pred_class = pred[order], pred_class[order]

    # Dense video ids, so (class, video) fits one int64 key.
    _, video = np.unique(np.concatenate([pred[:, 0], gt[:, 0]]), return_inverse=True)
    n_video = int(video.max()) + 1
    pred_key = pred_class * n_video + video[: len(pred)]
    gt_key = gt_class * n_video + video[len(pred) :]
    hits = _greedy_match(pred_key, pred[:, 2], pred[:, 3], gt_key, gt[:, 2], gt[:, 3], tious)

    num_gt = np.bincount(gt_class, minlength=n_class)
    bounds = np.searchsorted(pred_class, np.arange(n_class + 1))
    ap = np.zeros((n_tiou, n_class))
    for j in range(n_class):
        ap[:, j] = _voc_ap(hits[bounds[j] : bounds[j + 1]].T, num_gt[j])
    mean_ap = ap.mean(axis=1)
    return DetectionMAP(
        tious=tious,
        classes=classes,
        ap=ap,
        map=mean_ap,
        average=float(mean_ap.mean()),
        num_ground_truth=num_gt.astype(np.int64),
        num_predictions=np.diff(bounds).astype(np.int64),
    )


def _greedy_match(pred_key, pred_start, pred_end, gt_key, gt_start, gt_end, tious):
    """True-positive flags [P, n_tiou] of predictions ranked within their class.

    Predictions must come in ranking order within each key (class, video). Every
    prediction/ground-truth pair of the same key gets its IoU; pairs below the
    lowest threshold can never match and are dropped, and so are predictions
    left without pairs (false positives at every threshold). Round r then
    resolves, for all thresholds at once, the r-th remaining prediction of every
    key: each takes its best free ground truth (highest IoU, ties: first).
    """
    P, n_tiou = len(pred_key), len(tious)
    hits = np.zeros((P, n_tiou), dtype=bool)
    if P == 0:
        return hits
    g_order = np.argsort(gt_key, kind="stable")
    gt_key, gt_start, gt_end = gt_key[g_order], gt_start[g_order], gt_end[g_order]
    lo = np.searchsorted(gt_key, pred_key, side="left")
    count = np.searchsorted(gt_key, pred_key, side="right") - lo
    pair_pred = np.repeat(np.arange(P), count)
    first_pair = np.cumsum(count) - count
    pair_gt = lo[pair_pred] + (np.arange(len(pair_pred)) - first_pair[pair_pred])
    iou = _iou(pred_start[pair_pred], pred_end[pair_pred], gt_start[pair_gt], gt_end[pair_gt])
    useful = iou >= tious.min()
    pair_pred, pair_gt, iou = pair_pred[useful], pair_gt[useful], iou[useful]
    if len(pair_pred) == 0:
        return hits

    # Rank of each remaining prediction within its key (pair_pred ascends, and
    # within a key ascending index is ranking order).
    live = np.unique(pair_pred)
    by_key = np.argsort(pred_key[live], kind="stable")
    sorted_keys = pred_key[live][by_key]
    rank = np.empty(P, dtype=np.int64)
    rank[live[by_key]] = np.arange(len(live)) - np.searchsorted(sorted_keys, sorted_keys, side="left")
    pair_rank = rank[pair_pred]
    order = np.argsort(pair_rank, kind="stable")  # by round, then prediction, then ground truth
    pair_pred, pair_gt, iou, pair_rank = pair_pred[order], pair_gt[order], iou[order], pair_rank[order]
    rounds = np.searchsorted(pair_rank, np.arange(int(pair_rank[-1]) + 2))

    taken = np.zeros((len(gt_key), n_tiou), dtype=bool)
    for r in range(len(rounds) - 1):
        p = pair_pred[rounds[r] : rounds[r + 1]]
        g = pair_gt[rounds[r] : rounds[r + 1]]
        x = iou[rounds[r] : rounds[r + 1]]
        n = len(p)
        new = np.ones(n, dtype=bool)
        new[1:] = p[1:] != p[:-1]
        starts = np.flatnonzero(new)
        segment = np.cumsum(new) - 1
        free = (x[:, None] >= tious[None, :]) & ~taken[g]  # [n, n_tiou]
        value = np.where(free, x[:, None], -1.0)
        best = np.maximum.reduceat(value, starts, axis=0)
        at_best = free & (value == best[segment])
        first = np.minimum.reduceat(np.where(at_best, np.arange(n)[:, None], n), starts, axis=0)
        hit = first < n
        which, t = np.nonzero(hit)
        taken[g[first[which, t]], t] = True
        hits[p[starts]] = hit
    return hits


def _iou(s1, e1, s2, e2):
    inter = np.maximum(0.0, np.minimum(e1, e2) - np.maximum(s1, s2))
    union = (e1 - s1) + (e2 - s2) - inter
    out = np.zeros_like(inter)
    np.divide(inter, union, out=out, where=union > 0)
    return out


def _voc_ap(hits, num_positives):
    """VOC-interpolated AP per row of hits [n_tiou, n] (predictions in ranking order)."""
    n_tiou, n = hits.shape
    if n == 0:
        return np.zeros(n_tiou)
    tp = np.cumsum(hits, axis=1, dtype=np.float64)
    zeros = np.zeros((n_tiou, 1))
    precision = np.concatenate([zeros, tp / np.arange(1, n + 1), zeros], axis=1)
    precision = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
    recall = np.concatenate([zeros, tp / num_positives, np.ones((n_tiou, 1))], axis=1)
    # Steps where recall does not change contribute exactly 0.
    return np.sum(np.diff(recall, axis=1) * precision[:, 1:], axis=1)


# ------------------------------------------------------------------ THUMOS14 helpers


def _thumos_ground_truth(gt_segments, gt_labels, classes, factor):
    """Rows (video, class, start, end) in snippets, round half to even."""
    index = {name: i for i, name in enumerate(classes)}
    videos = []
    for v, labels in enumerate(gt_labels):
        # A name where a list of names belongs would be read letter by letter.
        if isinstance(labels, (str, bytes)) or not _is_sequence(labels):
            raise TypeError(f"gt_labels[{v}]: expected a sequence of class names, one per segment, got {type(labels).__name__}")
    for v, segments in enumerate(gt_segments):
        if not _is_sequence(segments):
            raise TypeError(f"gt_segments[{v}]: expected a sequence of [start, end] seconds, got {type(segments).__name__}")
    gt_segments = [_host(f"gt_segments[{v}]", segments) for v, segments in enumerate(gt_segments)]
    for v, segments in enumerate(gt_segments):
        videos.extend([v] * len(segments))
    if not videos:
        bounds = np.zeros((0, 2))
    else:
        flat = [segment for segments in gt_segments for segment in segments]
        try:
            bounds = _seconds(flat)
            if bounds.shape != (len(flat), 2):
                raise ValueError
        except (TypeError, ValueError):
            bounds = None
    # The segments first: a flat [start, end] pair would otherwise be blamed on the labels' count.
    if bounds is None or not np.isfinite(bounds).all() or (bounds[:, 1] < bounds[:, 0]).any():
        v = _first_bad_video(gt_segments)
        shown = _shown(gt_segments[v])
        if all(np.ndim(x) == 0 for x in gt_segments[v]):  # numbers (the video holds some: it was found bad)
            hint = f" (a video with one segment holds [{shown}])" if _is_segment(gt_segments[v]) else ""
            raise ValueError(f"gt_segments[{v}]: expected a sequence of [start, end] pairs, got the flat sequence {shown}{hint}")
        raise ValueError(f"gt_segments[{v}]: expected finite [start, end] seconds with end >= start, got {shown}")
    for v, (segments, labels) in enumerate(zip(gt_segments, gt_labels)):
        if len(labels) != len(segments):
            raise ValueError(f"gt_labels[{v}]: expected one label per segment ({len(segments)}), got {len(labels)}")
    if not videos:
        return np.zeros((0, 4))
    class_ids = []
    for v, labels in enumerate(gt_labels):
        for j, label in enumerate(labels):
            try:
                class_ids.append(index.get(_name(label), -1))
            except (TypeError, UnicodeDecodeError):
                raise TypeError(f"gt_labels[{v}][{j}]: expected a class name (str or UTF-8 bytes), got {label!r}") from None
    if -1 in class_ids:
        i = class_ids.index(-1)
        v = videos[i]
        j = i - videos.index(v)
        raise ValueError(f"gt_labels[{v}][{j}]: unknown class {_name(gt_labels[v][j])!r} (not in class_names)")
    # np.round rounds half to even, exactly like Python's round() on the same float64.
    with np.errstate(over="ignore"):
        snippets = np.round(bounds * factor)
    if not np.isfinite(snippets).all():
        i = int(np.flatnonzero(~np.isfinite(snippets).all(axis=1))[0])
        raise ValueError(f"factor: ground-truth segment ({bounds[i, 0]}, {bounds[i, 1]}) s of video {videos[i]} times "
                         f"factor {factor} is not finite in snippets")
    return np.column_stack([np.asarray(videos, dtype=np.float64), np.asarray(class_ids, dtype=np.float64), snippets])


def _is_sequence(value):
    """A per-video list of segments or labels: a list, tuple, array or tensor (not a
    mapping or set, whose iteration order or keys would be read as entries)."""
    return hasattr(value, "__len__") and hasattr(value, "__getitem__") and not isinstance(value, collections.abc.Mapping)


def _seconds(segments):
    """float64 of numbers; a TypeError or ValueError for anything else (text: numpy reads "6.4")."""
    array = np.asarray(segments)
    if _has_strings(array):
        raise TypeError("text where seconds belong")
    return array.astype(np.float64)


def _is_segment(pair):
    try:
        start, end = _seconds(pair)
    except (TypeError, ValueError):
        return False
    return bool(np.isfinite([start, end]).all() and end >= start)


def _first_bad_video(gt_segments):
    for v, segments in enumerate(gt_segments):
        try:
            array = _seconds(segments).reshape(len(segments), -1)
        except (TypeError, ValueError):
            return v
        if len(segments) and (array.shape[1] != 2 or not np.isfinite(array).all() or (array[:, 1] < array[:, 0]).any()):
            return v
    raise AssertionError("no malformed ground-truth segment found")


def _touches_ambiguous(pred, entries, names, factor):
    """Mask of predictions sharing a snippet with an ambiguous segment of their video."""
    videos = {}
    for i, name in enumerate(names):
        videos.setdefault(name, []).append(i)
    amb = [(v, s, e) for name, s, e in entries for v in videos.get(name, ())]
    if not amb:
        return np.zeros(len(pred), dtype=bool)
    amb = np.asarray(amb, dtype=np.float64)
    amb[:, 1:] = np.round(amb[:, 1:] * factor)
    amb = amb[np.argsort(amb[:, 0], kind="stable")]
    lo = np.searchsorted(amb[:, 0], pred[:, 0], side="left")
    count = np.searchsorted(amb[:, 0], pred[:, 0], side="right") - lo
    pair_pred = np.repeat(np.arange(len(pred)), count)
    pair_amb = lo[pair_pred] + (np.arange(len(pair_pred)) - (np.cumsum(count) - count)[pair_pred])
    shared = np.maximum(pred[pair_pred, 2], amb[pair_amb, 1]) < np.minimum(pred[pair_pred, 3], amb[pair_amb, 2])
    return np.bincount(pair_pred[shared], minlength=len(pred)) > 0


def _ambiguous_entries(ambiguous):
    if ambiguous is None:
        return []
    if not hasattr(ambiguous, "__iter__"):
        raise TypeError("ambiguous: expected None, a path or a sequence of (name, start, end), "
                        f"got {type(ambiguous).__name__}")
    entries = []
    for i, entry in enumerate(ambiguous):
        try:
            name, start, end = entry
            entry = (_name(name), float(start), float(end))
        except (TypeError, ValueError):
            raise ValueError(f"ambiguous[{i}]: expected (name, start, end), got {entry!r}") from None
        if not (math.isfinite(entry[1]) and math.isfinite(entry[2])):
            raise ValueError(f"ambiguous[{i}]: expected finite start and end seconds, got {entry[1:]}")
        entries.append(entry)
    return entries


# ------------------------------------------------------------------ argument checks


def _rows(name, value, columns):
    """A float64 [n, len(columns)] copy of rows given as an array, tensor or lists."""
    ncols = len(columns)
    array = _float64(name, value, f"numeric rows of {ncols} columns ({', '.join(columns)})")
    if array.size == 0:
        return np.zeros((0, ncols))
    if array.ndim != 2 or array.shape[1] != ncols:
        raise ValueError(f"{name}: expected rows of {ncols} columns ({', '.join(columns)}), got shape {array.shape}")
    for j in (0, 1):
        ids = array[:, j]
        # Below 2**53, where float64 holds every integer: past it distinct ids would
        # round to one value (2**53 + 1 to 2**53) and be matched as the same.
        bad = ~np.isfinite(ids) | (ids < 0) | (ids != np.floor(ids)) | (ids >= 2.0**53)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{name}: column {j} ({columns[j]}) must hold integers in [0, 2**53), row {i} has {ids[i]}")
    bounds = array[:, 2:4]
    bad = ~np.isfinite(bounds).all(axis=1) | (bounds[:, 1] < bounds[:, 0])
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name}: expected finite start <= end, row {i} has ({bounds[i, 0]}, {bounds[i, 1]})")
    if ncols == 5 and np.isnan(array[:, 4]).any():
        i = int(np.flatnonzero(np.isnan(array[:, 4]))[0])
        raise ValueError(f"{name}: NaN score in row {i}")
    return array


def _tious(value):
    if value is None or isinstance(value, (str, bytes)):
        raise TypeError(f"tiou_thresholds: expected a sequence of numbers, got {type(value).__name__} {value!r}")
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.is_floating_point() and value.dtype != torch.float64:
            value = value.double()  # numpy has no bfloat16
    # Strings, bools and ragged lists are refused: np.array(..., float64) read "0.5" and True as numbers.
    not_numbers = (str, bytes, bool, np.bool_)
    try:
        raw = np.asarray(value)
        numbers = raw.dtype.kind in "iuf" or (raw.dtype.kind == "O" and not any(isinstance(x, not_numbers) for x in raw.flat))
        if isinstance(value, (list, tuple)) and any(isinstance(x, not_numbers) for x in value):
            numbers = False  # a list mixing bools and numbers, [True, 0.5], is float64 in numpy
        tious = raw.astype(np.float64) if numbers else None
    except (TypeError, ValueError):
        tious = None
    if tious is None:
        raise ValueError(f"tiou_thresholds: expected a sequence of numbers, got {value!r}")
    if tious.ndim > 1:
        raise ValueError(f"tiou_thresholds: expected a 1-d sequence, got shape {list(tious.shape)}")
    tious = tious.reshape(-1)
    if tious.size == 0:
        raise ValueError("tiou_thresholds: expected at least one threshold")
    if not ((tious > 0) & (tious <= 1)).all():
        raise ValueError(f"tiou_thresholds: expected values in (0, 1], got {tious.tolist()}")
    values, counts = np.unique(tious, return_counts=True)
    if (counts > 1).any():
        # A repeated threshold would count twice in the average mAP.
        raise ValueError(f"tiou_thresholds: {float(values[counts > 1][0])!r} is given twice")
    return tious


def _float64(name, value, what):
    """A float64 numpy copy of an array, tensor or nested lists (of numbers, arrays or tensors),
    or a ValueError "{name}: expected {what}". Complex values are refused: numpy would drop their
    imaginary parts with a warning. Strings are refused: numpy would read "0.5" as a number."""
    _checks.has_values("the evaluation", **{name: value})
    if isinstance(value, torch.Tensor):
        if value.is_complex():
            raise ValueError(f"{name}: expected {what}, got a complex tensor")
        value = value.detach().cpu().to(torch.float64).numpy()
    try:
        array = _array(name, value)
        if np.iscomplexobj(array) or _has_strings(array):
            raise TypeError
        return np.array(array, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected {what}") from None


def _array(name, value):
    """``np.asarray(value)``; where numpy cannot read the tensors inside a list or tuple (an
    evaluation loop's per-video results, which may require grad, be bfloat16 or live on a
    GPU), those are read detached, on the CPU, bfloat16 as float32 (exact). A TypeError or
    ValueError where that fails too; a meta tensor is a ValueError naming ``name``."""
    try:
        array = np.asarray(value)
    except (TypeError, ValueError, RuntimeError):
        array = None
    if array is None or array.dtype == object:  # (tensors numpy cannot read may come out as objects)
        array = np.asarray(_host(name, value))
    return array


def _host(name, value):
    """Tensors, alone or inside lists and tuples, as numpy arrays (see ``_array``)."""
    if isinstance(value, torch.Tensor):
        _checks.has_values("the evaluation", **{name: value})
        value = value.detach().cpu()
        try:
            return (value.float() if value.dtype == torch.bfloat16 else value).numpy()
        except (TypeError, RuntimeError):  # float8, complex32, sparse ...
            raise TypeError(f"{name}: numpy cannot read a {value.dtype} ({value.layout}) tensor") from None
    if isinstance(value, (list, tuple)):
        return [_host(name, v) for v in value]
    return value


def _has_strings(array):
    """Whether numpy would read text in ``array`` as numbers ("0.5")."""
    if array.dtype.kind in "USV":
        return True
    if array.dtype.kind != "O":
        return False
    types = set(map(type, array.flat))  # (a set of types: a tenth of the time of isinstance on each)
    return any(issubclass(t, (str, bytes, np.str_, np.bytes_)) for t in types)


def _shown(value):
    """A per-video entry as plain nested lists for a message (numpy arrays print as array(...))."""
    try:
        return _seconds(value).tolist()
    except (TypeError, ValueError):
        return [np.asarray(x).tolist() if isinstance(x, np.ndarray) else x for x in value]


def _numeric_tensor(name, value, what):
    """A tensor of an array or nested lists of numbers, keeping a numpy array's dtype
    (the proposals compare scores in their own dtype; a list of tensors of one dtype and shape
    is stacked, keeping theirs); a TypeError or ValueError "{name}: expected {what}" for anything else."""
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        _checks.has_values("the evaluation", **{f"{name}[{i}]": v for i, v in enumerate(value)})
        if len({(v.dtype, v.shape) for v in value}) == 1 and not value[0].is_complex():
            return torch.stack([v.detach().cpu() for v in value])
    try:
        array = _array(name, value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected {what} (a ragged or malformed sequence, or tensors numpy cannot read)") from None
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{name}: expected {what}, got {type(value).__name__} of {array.dtype}")
    return torch.as_tensor(array)


def _matrix(name, value):
    array = _float64(name, value, "a numeric [V, C] array")
    if array.ndim != 2:
        raise ValueError(f"{name}: expected a 2-d [V, C] array, got shape {array.shape}")
    return array


def _name(x):
    """A name given as str or UTF-8 bytes; anything else (None, a number) is a TypeError,
    not a name made of its repr."""
    if isinstance(x, (bytes, np.bytes_)):
        return bytes(x).decode("utf-8")
    if not isinstance(x, str):
        raise TypeError(f"expected a str or UTF-8 bytes, got {type(x).__name__}")
    return str(x)


def _names(arg, values):
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise TypeError(f"{arg}: expected a sequence of names, got {type(values).__name__}")
    names = []
    for i, v in enumerate(values):
        try:
            names.append(_name(v))
        except UnicodeDecodeError:
            raise ValueError(f"{arg}[{i}]: expected a str or UTF-8 bytes, got {v!r}") from None
        except TypeError as exc:
            raise TypeError(f"{arg}[{i}]: {exc}") from None
    return names


def _check_index_range(name, column, limit, what, against):
    if len(column) and column.max() >= limit:
        i = int(np.argmax(column >= limit))
        raise ValueError(f"{name}: {what} index {int(column[i])} in row {i} is out of range for {limit} {against}")


def _positive(name, value):
    message = f"{name}: expected a finite number > 0, got {value!r}"
    try:
        value = _checks.number(name, value)
    except TypeError:
        raise ValueError(message) from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(message)
    return value
