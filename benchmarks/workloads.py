"""Synthetic inputs shaped like WTAL data, deterministic from a seed (numpy's RandomState).

THUMOS14's test set, which the sizes imitate: 212 videos with temporal
annotations, 20 action classes, I3D snippets of 16 frames at 25 fps, so a
video is about 50 to 2600 snippets long (mean about 340).
"""

import numpy as np

THUMOS_VIDEOS = 212
THUMOS_CLASSES = 20
THUMOS_MAX_LEN = 2600
THUMOS_PROPOSALS_PER_GROUP = 60  # mean proposals per (video, class) before NMS


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


def thumos_segments(rng, videos=THUMOS_VIDEOS, classes=THUMOS_CLASSES, per_group=THUMOS_PROPOSALS_PER_GROUP):
    """Proposals of a THUMOS-sized evaluation: every (video, class) gets 30..90 (mean 60).

    Within a group, proposals cluster around 4 action instances (centre jitter
    of 8 snippets, lengths 2..40), as multi-threshold proposals do. Returns
    segments [M, 2] float32 (snippets), scores [M] float32 and groups [M] int64
    (``video * classes + class``), in group order as WTAL code produces them.
    """
    lengths = thumos_lengths(rng, videos)
    n_groups = videos * classes
    counts = rng.randint(per_group // 2, per_group * 3 // 2 + 1, size=n_groups)
    groups = np.repeat(np.arange(n_groups, dtype=np.int64), counts)
    video_len = lengths[groups // classes].astype(np.float64)
    instance_pos = rng.uniform(0.0, 1.0, size=(n_groups, 4))
    pick = rng.randint(0, 4, size=groups.size)
    centre = instance_pos[groups, pick] * video_len + rng.normal(0.0, 8.0, size=groups.size)
    length = rng.uniform(2.0, 40.0, size=groups.size)
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
    lengths = thumos_lengths(rng, videos, max_len)
    n_labels = rng.choice([1, 2, 3], p=[0.75, 0.2, 0.05], size=videos)
    video_scores = rng.uniform(0.0, 0.15, size=(videos, classes))
    gt = []
    for v in range(videos):
        labelled = rng.choice(classes, n_labels[v], replace=False)
        video_scores[v, labelled] = rng.uniform(0.5, 1.0, size=n_labels[v])
        for c in labelled:
            for _ in range(1 + rng.poisson(6)):
                length = rng.uniform(3.0, 60.0)
                start = rng.uniform(0.0, max(1.0, lengths[v] - length))
                gt.append((v, c, np.floor(start), min(float(lengths[v]), np.floor(start + length))))
    T = int(lengths.max())
    w = CAS_SMOOTH
    noise = rng.normal(size=(videos, T + w, classes)).astype(np.float32)
    walk = np.cumsum(noise, axis=1)
    smooth = (walk[:, w:] - walk[:, :-w]) / np.sqrt(w)
    cas = CAS_SCALE / (1.0 + np.exp(-1.5 * smooth))
    for v, c, s, e in gt:
        cas[v, int(s) : int(e), c] += CAS_BUMP
    cas[np.arange(T)[None, :] >= lengths[:, None]] = 0.0
    ground_truth = np.asarray(gt, dtype=np.float64).reshape(-1, 4)
    return cas.astype(np.float32), video_scores.astype(np.float32), lengths, ground_truth


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
