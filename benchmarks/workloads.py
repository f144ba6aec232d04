"""Synthetic inputs shaped like WTAL data, deterministic from a seed (numpy's RandomState).

THUMOS14's test set, which the THUMOS sizes imitate: 212 videos with temporal
annotations, 20 action classes, I3D snippets of 16 frames at 25 fps, so a
video is about 50 to 2600 snippets long (mean about 340).

ActivityNet 1.3's validation set, which the ActivityNet sizes imitate: 4926
videos, 200 classes, about 2 minutes a video (about 180 snippets of 16 frames
at 25 fps, up to about 10 minutes), usually one labelled class a video with
one or two long instances. The benchmarks take a tenth of it
(``ACTIVITYNET_VIDEOS``): the whole set's padded [V, T, C] float32 scores
would be gigabytes, and its Python-loop anchors minutes.
"""

import numpy as np

THUMOS_VIDEOS = 212
THUMOS_CLASSES = 20
THUMOS_MAX_LEN = 2600
THUMOS_PROPOSALS_PER_GROUP = 60  # mean proposals per (video, class) before NMS


ACTIVITYNET_VALIDATION_VIDEOS = 4926
ACTIVITYNET_VIDEOS = 500  # the benchmarks' share of the validation set (see above)
ACTIVITYNET_CLASSES = 200
ACTIVITYNET_MAX_LEN = 750  # snippets (8 minutes): padding to the longest real video (~940) only adds zeros
ACTIVITYNET_PROPOSALS_PER_GROUP = 8  # mean proposals per (video, class) when every class is scored


def thumos_lengths(rng, videos=THUMOS_VIDEOS, max_len=THUMOS_MAX_LEN):
    """Video lengths in snippets: log-normal (median 225, mean about 340), 30..max_len, the longest max_len."""
    lengths = np.exp(rng.normal(np.log(225.0), 0.8, size=videos))
    lengths = np.clip(np.round(lengths), min(30, max_len), max_len).astype(np.int64)
    lengths[rng.randint(videos)] = max_len
    return lengths


def one_group_segments(rng, m):
    """m segments on a timeline m snippets long, lengths uniform in [1, 31): about 16 overlap each point.

    The density does not change with m, so the share of segments hard NMS keeps
    (about a quarter at IoU 0.4) does not either.
    """
    centres = rng.uniform(0.0, float(m), size=m)
    lengths = rng.uniform(1.0, 31.0, size=m)
    segments = np.stack([centres - lengths / 2, centres + lengths / 2], axis=1)
    scores = rng.uniform(0.0, 1.0, size=m)
    return segments.astype(np.float32), scores.astype(np.float32)


def activitynet_lengths(rng, videos=ACTIVITYNET_VIDEOS, max_len=ACTIVITYNET_MAX_LEN):
    """Video lengths in snippets: log-normal (median 150, mean about 190), 20..max_len, the longest max_len."""
    lengths = np.exp(rng.normal(np.log(150.0), 0.7, size=videos))
    lengths = np.clip(np.round(lengths), min(20, max_len), max_len).astype(np.int64)
    lengths[rng.randint(videos)] = max_len
    return lengths


def thumos_segments(rng, videos=THUMOS_VIDEOS, classes=THUMOS_CLASSES, per_group=THUMOS_PROPOSALS_PER_GROUP):
    """Proposals of a THUMOS-sized evaluation: every (video, class) gets 30..90 (mean 60).

    Within a group, proposals cluster around 4 action instances (centre jitter
    of 8 snippets, lengths 2..40), as multi-threshold proposals do. Returns
    segments [M, 2] float32 (snippets), scores [M] float32 and groups [M] int64
    (``video * classes + class``), in group order as WTAL code produces them.
    """
    return _grouped_segments(rng, thumos_lengths(rng, videos), classes, per_group, (2.0, 40.0))


def activitynet_segments(rng, videos=ACTIVITYNET_VIDEOS, classes=ACTIVITYNET_CLASSES, per_group=ACTIVITYNET_PROPOSALS_PER_GROUP):
    """Proposals of an ActivityNet-like evaluation that scores every class of every video.

    Every (video, class) gets 4..12 (mean 8) proposals around 4 instance
    positions, lengths 4..120 snippets; many small groups (100k at the
    default size, about 800k segments). Same layout as ``thumos_segments``.
    """
    return _grouped_segments(rng, activitynet_lengths(rng, videos), classes, per_group, (4.0, 120.0))


def _grouped_segments(rng, lengths, classes, per_group, length_range):
    videos = len(lengths)
    n_groups = videos * classes
    counts = rng.randint(per_group // 2, per_group * 3 // 2 + 1, size=n_groups)
    groups = np.repeat(np.arange(n_groups, dtype=np.int64), counts)
    video_len = lengths[groups // classes].astype(np.float64)
    instance_pos = rng.uniform(0.0, 1.0, size=(n_groups, 4))
    pick = rng.randint(0, 4, size=groups.size)
    centre = instance_pos[groups, pick] * video_len + rng.normal(0.0, 8.0, size=groups.size)
    length = rng.uniform(length_range[0], length_range[1], size=groups.size)
    start = np.clip(centre - length / 2, 0.0, video_len - 1)
    end = np.clip(centre + length / 2, start + 1, video_len)
    segments = np.stack([start, end], axis=1).astype(np.float32)
    scores = rng.uniform(0.0, 1.0, size=groups.size).astype(np.float32)
    return segments, scores, groups


def split_groups(groups):
    """Index arrays of each group, in group order (what a per-(video, class) loop iterates over)."""
    order = np.argsort(groups, kind="stable")
    sorted_groups = groups[order]
    cuts = np.flatnonzero(np.diff(sorted_groups)) + 1
    return np.split(order, cuts)


# Class activation sequences: a sigmoid of time-smoothed Gaussian noise (window
# CAS_SMOOTH snippets) scaled by CAS_SCALE, plus CAS_BUMP inside ground-truth
# instances. With MMSD's 20 thresholds (0.0003 .. 0.0098) this gives about 66k
# proposals before NMS for the THUMOS-sized set, the count the localization
# issue measured its Python-loop protocol on.
CAS_SMOOTH = 10
CAS_SCALE = 0.012
CAS_BUMP = 0.004


def thumos_localization(rng, videos=THUMOS_VIDEOS, classes=THUMOS_CLASSES, max_len=THUMOS_MAX_LEN):
    """A THUMOS-sized evaluation input for MMSD's proposals and detection mAP.

    Returns (cas [V, T, C] float32 zero-padded, video_scores [V, C] float32,
    lengths [V] int64, ground_truth [G, 4] float64 rows (video, class, start,
    end) in snippets). Each video has 1 to 3 labelled classes (score 0.5..1,
    the others under 0.15, so only labelled classes pass MMSD's 0.2), and
    1 + Poisson(6) ground-truth instances of 3..60 snippets per labelled class.
    """
    video_scores, lengths, ground_truth = thumos_annotations(rng, videos, classes, max_len)
    return localization_cas(rng, lengths, ground_truth, classes), video_scores, lengths, ground_truth


def thumos_annotations(rng, videos=THUMOS_VIDEOS, classes=THUMOS_CLASSES, max_len=THUMOS_MAX_LEN):
    """The cheap part of ``thumos_localization``: (video_scores, lengths, ground_truth).

    ``localization_cas(rng, lengths, ground_truth, classes)`` with the same rng
    right after it gives the scores ``thumos_localization`` gives.
    """
    lengths = thumos_lengths(rng, videos, max_len)
    n_labels = rng.choice([1, 2, 3], p=[0.75, 0.2, 0.05], size=videos)
    return _labels_and_instances(rng, lengths, classes, n_labels, lambda v: 1 + rng.poisson(6), lambda v: rng.uniform(3.0, 60.0))


def activitynet_annotations(rng, videos=ACTIVITYNET_VIDEOS, classes=ACTIVITYNET_CLASSES, max_len=ACTIVITYNET_MAX_LEN):
    """An ActivityNet-like evaluation's (video_scores, lengths, ground_truth); scores from ``localization_cas``.

    One labelled class in 9 videos of 10, two in the rest (score 0.5..1, the
    others under 0.15), 1 + Poisson(0.5) instances per labelled class, each
    5% to 80% of its video long, as ActivityNet's long actions are.
    """
    lengths = activitynet_lengths(rng, videos, max_len)
    n_labels = rng.choice([1, 2], p=[0.9, 0.1], size=videos)
    return _labels_and_instances(
        rng, lengths, classes, n_labels, lambda v: 1 + rng.poisson(0.5), lambda v: rng.uniform(0.05, 0.8) * lengths[v]
    )


def _labels_and_instances(rng, lengths, classes, n_labels, count, duration):
    videos = len(lengths)
    video_scores = rng.uniform(0.0, 0.15, size=(videos, classes))
    gt = []
    for v in range(videos):
        labelled = rng.choice(classes, n_labels[v], replace=False)
        video_scores[v, labelled] = rng.uniform(0.5, 1.0, size=n_labels[v])
        for c in labelled:
            for _ in range(count(v)):
                length = duration(v)
                start = rng.uniform(0.0, max(1.0, lengths[v] - length))
                gt.append((v, c, np.floor(start), min(float(lengths[v]), np.floor(start + length))))
    ground_truth = np.asarray(gt, dtype=np.float64).reshape(-1, 4)
    return video_scores.astype(np.float32), lengths, ground_truth


# Videos whose scores are drawn at once: bounds the temporary arrays (four of
# [chunk, T, C] float32) for large class counts.
_CAS_CHUNK_ELEMENTS = 1 << 24


def localization_cas(rng, lengths, ground_truth, classes):
    """Class activation sequences [V, T, C] float32 (T = the longest length), zero past each length.

    A sigmoid of time-smoothed Gaussian noise (window CAS_SMOOTH) scaled by
    CAS_SCALE, plus CAS_BUMP inside each ground-truth instance.
    """
    videos = len(lengths)
    T = int(lengths.max())
    w = CAS_SMOOTH
    cas = np.empty((videos, T, classes), dtype=np.float32)
    chunk = max(1, _CAS_CHUNK_ELEMENTS // ((T + w) * classes))
    gt_video = ground_truth[:, 0].astype(np.int64)
    for v0 in range(0, videos, chunk):
        n = min(chunk, videos - v0)
        # Chunks draw the same numbers as one draw of the whole (legacy RandomState).
        noise = rng.normal(size=(n, T + w, classes)).astype(np.float32)
        walk = np.cumsum(noise, axis=1)
        smooth = (walk[:, w:] - walk[:, :-w]) / np.sqrt(w)
        part = CAS_SCALE / (1.0 + np.exp(-1.5 * smooth))
        for v, c, s, e in ground_truth[(gt_video >= v0) & (gt_video < v0 + n)]:
            part[int(v) - v0, int(s) : int(e), int(c)] += CAS_BUMP
        part[np.arange(T)[None, :] >= lengths[v0 : v0 + n, None]] = 0.0
        cas[v0 : v0 + n] = part
    return cas


THUMOS14_FACTOR = 25.0 / 16.0  # snippets per second of W-TALC's I3D features


def thumos14_annotations(ground_truth, videos, classes):
    """The THUMOS14 protocol's inputs for ground-truth rows in snippets.

    Returns (video_names, gt_segments, gt_labels, class_names, ambiguous) as
    MMSD's W-TALC files give them: per-video [start, end] lists in seconds,
    per-video class names, sorted class names, and (name, start, end) seconds
    of ambiguous segments, one just after an instance in every third video.
    """
    names = [f"video_test_{v:07d}" for v in range(videos)]
    class_names = [f"Action{c:02d}" for c in range(classes)]
    segments = [[] for _ in range(videos)]
    labels = [[] for _ in range(videos)]
    for v, c, s, e in ground_truth:
        segments[int(v)].append([s / THUMOS14_FACTOR, e / THUMOS14_FACTOR])
        labels[int(v)].append(class_names[int(c)])
    ambiguous = [(names[v], seg[0][1] + 1.0, seg[0][1] + 3.0) for v, seg in enumerate(segments) if seg and v % 3 == 0]
    return names, segments, labels, class_names, ambiguous
