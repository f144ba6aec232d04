"""WTAL data in the W-TALC file layout (MMSD, W-TALC, CO2-Net), and padded batches.

``<root>/<Dataset>/`` holds:

===============================  ==========================================================
``<Dataset>-<TYPE>-JOINTFeatures.npy``  object array of [T_i, D] float arrays (RGB half, then flow);
                                 TYPE is the feature type, I3D (default) or UNT
``labels_all.npy``               per video, the list of its class names (video-level labels)
``segments.npy``                 per video, the list of [start, end] ground truth in seconds
``labels.npy``                   per video, the class name of each of its segments
``classlist.npy``                the class names (bytes), in class-index order
``videoname.npy``                the video names (bytes)
``subset.npy``                   the split of each video (bytes): for THUMOS14 "validation"
                                 is the training data and "test" the test data
``duration.npy``                 video durations in seconds
``Ambiguous_test.txt``           optional: ``name  start end`` per line (seconds); predictions
                                 that touch one are ignored by the THUMOS14 protocol
===============================  ==========================================================

The files are pickled object arrays (some written by Python 2), so they are
read with ``allow_pickle=True``; names may be bytes or str. Every problem is
reported as a ``DataError`` naming the file (and the video) at fault.
"""

import math
import os

import numpy as np
import torch

# Snippets per second of each feature type (MMSD's --feature-type and the factor its evaluation
# converts seconds with): I3D, one snippet per 16 frames at 25 fps; UNT (UntrimmedNet), 10/4.
FEATURE_RATES = {"I3D": 25.0 / 16.0, "UNT": 10.0 / 4.0}
SNIPPETS_PER_SECOND = FEATURE_RATES["I3D"]

# Features are stored as float32 (the model's precision): wider values must fit.
FLOAT32_MAX = float(np.finfo(np.float32).max)

ARRAY_FILES = ("labels_all", "segments", "labels", "classlist", "videoname", "subset", "duration")
AMBIGUOUS_FILE = "Ambiguous_test.txt"


class DataError(ValueError):
    """A dataset file is missing, unreadable, or disagrees with the others."""


def features_file(dataset, feature_type="I3D"):
    return f"{dataset}-{feature_type}-JOINTFeatures.npy"


def load_wtalc(root, dataset="Thumos14reduced", feature_type="I3D", feature_type_kept=False):
    """Read ``<root>/<dataset>/`` (features of ``feature_type``) into a ``WTALCData``.

    ``feature_type_kept``: the feature type is a checkpoint's, which --resume and --eval-only
    keep; an error then does not advise another --feature-type."""
    if feature_type not in FEATURE_RATES:
        raise DataError(f"--feature-type: expected one of {', '.join(FEATURE_RATES)}, got {feature_type!r}")
    folder = os.path.join(root, dataset)
    if not root:
        raise DataError("--data-root: empty path")
    if not os.path.isdir(root):
        raise DataError(f"--data-root: {root} is not a directory")
    if not os.path.isdir(folder):
        present = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        raise DataError(f"{folder}: no such dataset folder (datasets in {root}: {', '.join(present) or 'none'})")
    features_path = os.path.join(folder, features_file(dataset, feature_type))
    if not os.path.exists(features_path):
        others = [t for t in FEATURE_RATES if t != feature_type and os.path.isfile(os.path.join(folder, features_file(dataset, t)))]
        if others and feature_type_kept:
            raise DataError(
                f"{features_path}: file not found; the folder has {features_file(dataset, others[0])}, but the "
                f"checkpoint's model was trained on {feature_type} features (--feature-type {feature_type}, which "
                f"--resume and --eval-only keep); give --data-root of a folder with {feature_type} features"
            )
        if others:
            raise DataError(
                f"{features_path}: file not found; the folder has {features_file(dataset, others[0])}: "
                f"give --feature-type {others[0]} for those features"
            )
    arrays = {"features": _load_npy(features_path)}
    for name in ARRAY_FILES:
        arrays[name] = _load_npy(os.path.join(folder, name + ".npy"))
    ambiguous_path = os.path.join(folder, AMBIGUOUS_FILE)
    if os.path.exists(ambiguous_path) and not os.path.isfile(ambiguous_path):
        raise DataError(f"{ambiguous_path}: expected a text file (or nothing: it is optional), got a directory or device")
    arrays["ambiguous"] = _read_ambiguous(ambiguous_path) if os.path.isfile(ambiguous_path) else []
    return WTALCData.from_arrays(arrays, dataset, source=folder, feature_type=feature_type)


def _load_npy(path):
    if os.path.exists(path) and not os.path.isfile(path):
        raise DataError(f"{path}: expected a .npy file, got a directory or device")
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    try:
        return np.load(path, allow_pickle=True)
    except UnicodeError:
        # Object arrays pickled by Python 2 (W-TALC's files) hold its str, which numpy cannot
        # decode as ASCII (numpy >= 2 raises that UnicodeDecodeError again as a UnicodeError, its
        # parent class). Read as bytes, as W-TALC's loader does: arrays come back whole, and names
        # as bytes, which _text decodes (UTF-8, else latin-1).
        try:
            return np.load(path, allow_pickle=True, encoding="bytes")
        except Exception as exc:  # noqa: BLE001 - any failure here means an unreadable file
            raise DataError(f"{path}: cannot be read as a .npy file ({type(exc).__name__}: {_unnamed(exc, path)})") from None
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{path}: cannot be read as a .npy file ({type(exc).__name__}: {_unnamed(exc, path)})") from None


def _unnamed(exc, path):
    """``exc``'s message without the path ours starts with (numpy: "Failed to interpret file
    '<path>' as a pickle"): once in a line is enough."""
    return str(exc).replace(f" {os.fspath(path)!r}", "")


def _read_ambiguous(path):
    from mmsd_ext.evaluate import read_ambiguous

    try:
        return read_ambiguous(path)
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except ValueError as exc:
        # read_ambiguous names the file itself ("ambiguous: <path> line 3: ..."): once is enough.
        message = str(exc)
        prefix = f"ambiguous: {os.fspath(path)} "
        raise DataError(f"{path}: {message[len(prefix) :] if message.startswith(prefix) else message}") from None


def _holds_text(value):
    """Whether ``value`` (an array or nested sequence) holds a str or bytes entry."""
    if isinstance(value, (str, bytes, np.str_, np.bytes_)):
        return True
    if isinstance(value, np.ndarray) and value.dtype.kind in "US":
        return True
    if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.dtype == object):
        return any(_holds_text(v) for v in value)
    return False


def _text(value):
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            # Files written by Python 2 tools may hold latin-1 names; latin-1 decodes any byte.
            return bytes(value).decode("latin-1")
    return str(value)


class WTALCData:
    """One dataset in memory: ragged features, labels, ground truth, splits.

    Attributes: ``name``, ``classes`` (list of str), ``videos`` (names),
    ``subsets`` (str per video), ``features`` (list of float32 [T_i, D] arrays),
    ``labels`` (float32 [N, C] multi-hot), ``segments`` (list of float64 [n_i, 2]
    arrays, seconds), ``segment_classes`` (list of int64 [n_i] arrays),
    ``durations``, ``ambiguous`` (list of (video, start, end) in seconds),
    ``feature_dim``, ``num_classes``.
    """

    def __init__(
        self, name, classes, videos, subsets, features, labels, segments, segment_classes, durations, ambiguous, source=None
    ):
        self.name = name
        self.classes = classes
        self.videos = videos
        self.subsets = subsets
        self.features = features
        self.labels = labels
        self.segments = segments
        self.segment_classes = segment_classes
        self.durations = durations
        self.ambiguous = ambiguous
        self.source = source
        # (train, test) subset names from elsewhere (the checkpoint of an evaluation), used
        # where the subsets present cannot tell THUMOS14's layout from ActivityNet's.
        self.known_splits = None
        self.feature_dim = features[0].shape[1] if features else 0
        self.num_classes = len(classes)

    @classmethod
    def from_arrays(cls, arrays, name, source=None, feature_type="I3D"):
        """Validate and convert the arrays as stored in the files (see the module docstring);
        ``feature_type`` names the features file in errors."""
        where = source or f"<{name} in memory>"

        def fail(file, message):
            raise DataError(f"{os.path.join(where, file)}: {message}")

        feat_file = features_file(name, feature_type)
        # A 0-d array (a single object saved instead of one entry per video: a dict, a str, a
        # number) has no length; what it holds is named.
        for key, file in [("features", feat_file)] + [(f, f + ".npy") for f in ARRAY_FILES]:
            if _ndim(arrays[key]) == 0:
                per = "class" if key == "classlist" else "video"
                held = arrays[key][()] if isinstance(arrays[key], np.ndarray) else arrays[key]
                held = held.item() if isinstance(held, np.generic) else held  # np.str_('a') as 'a'
                fail(file, f"expected an array with one entry per {per}, got a 0-d array holding {type(held).__name__} {held!r:.60}")
        if _ndim(arrays["classlist"]) != 1:
            # (a [2, 2] array had been read as four classes)
            fail("classlist.npy", f"expected a 1-d array of class names, got shape {np.shape(arrays['classlist'])}")
        classes = [_text(c) for c in arrays["classlist"]]
        if not classes:
            fail("classlist.npy", "no classes")
        if len(set(classes)) != len(classes):
            repeated = next(c for i, c in enumerate(classes) if c in classes[:i])
            at = [i for i, c in enumerate(classes) if c == repeated]
            fail("classlist.npy", f"class {repeated!r} is listed more than once (at {', '.join(map(str, at))})")
        index = {c: i for i, c in enumerate(classes)}

        raw_features = arrays["features"]
        n = len(raw_features)
        if n == 0:
            fail(feat_file, "no videos")
        for file in ARRAY_FILES[:-1]:
            if file != "classlist" and len(arrays[file]) != n:
                fail(f"{file}.npy", f"{len(arrays[file])} entries, but {feat_file} has {n} videos")
        for file in ("videoname", "subset"):
            if _ndim(arrays[file]) != 1:
                fail(f"{file}.npy", f"expected a 1-d array of {n} names, got shape {np.shape(arrays[file])}")
        # Names, one per video (they name the video in the errors from here on).
        videos = [_name_of(v, fail, "videoname.npy", i) for i, v in enumerate(arrays["videoname"])]
        subsets = [_name_of(s, fail, "subset.npy", i) for i, s in enumerate(arrays["subset"])]
        durations = np.asarray(arrays["duration"], dtype=object)
        if durations.ndim > 1 and durations.size != n:
            fail("duration.npy", f"expected one number per video ({n}), got shape {durations.shape}")
        durations = durations.reshape(-1)
        if len(durations) != n:
            fail("duration.npy", f"{len(durations)} entries, but {feat_file} has {n} videos")

        features = []
        dim = None
        for i, f in enumerate(raw_features):
            booleans = False
            try:
                f = np.asarray(f)
                # True/False (a mask or a thresholded copy saved in place of the features) would
                # load as 1.0/0.0 and train on.
                booleans = f.dtype.kind == "b" or (f.dtype.kind == "O" and any(isinstance(x, (bool, np.bool_)) for x in f.flat))
                # Real numbers only: numpy would drop a complex part with a warning, and read
                # numeric strings as their values.
                if booleans or f.dtype.kind not in "fiuO" or (
                    f.dtype.kind == "O" and any(isinstance(x, (str, bytes, complex, np.str_, np.bytes_)) for x in f.flat)
                ):
                    raise TypeError
                if f.dtype.kind != "f":
                    f = f.astype(np.float64)  # integers and objects as numbers first, to check their range
            except (TypeError, ValueError):
                fail(feat_file, f"video {i} ({videos[i]}): features are {'booleans, not ' if booleans else 'not '}real numbers")
            except OverflowError:  # a Python int beyond any float
                fail(feat_file, f"video {i} ({videos[i]}): features beyond float32's range (+-{FLOAT32_MAX:.4g})")
            if f.ndim != 2 or f.shape[0] < 1:
                fail(feat_file, f"video {i} ({videos[i]}): expected a [T, D] array with T >= 1, got shape {f.shape}")
            if dim is None:
                dim = f.shape[1]
            if f.shape[1] != dim:
                fail(feat_file, f"video {i} ({videos[i]}): feature dimension {f.shape[1]}, but video 0 has {dim}")
            # Checked before the cast to float32, which turns finite values beyond its range into
            # inf (with numpy's "overflow encountered in cast" warning).
            if not np.isfinite(f).all():
                fail(feat_file, f"video {i} ({videos[i]}): features hold NaN or inf")
            largest = float(np.abs(f).max()) if f.size else 0.0
            if largest > FLOAT32_MAX:
                fail(
                    feat_file,
                    f"video {i} ({videos[i]}): features reach {largest:.4g} in magnitude, beyond float32's range "
                    f"(+-{FLOAT32_MAX:.4g}), in which the model computes",
                )
            features.append(f.astype(np.float32))
        if dim == 0:
            fail(feat_file, "feature dimension 0; expected RGB and flow halves of equal size")
        if dim % 2:
            fail(feat_file, f"feature dimension {dim} is odd; expected RGB and flow halves of equal size")

        first_of = {}
        for i, v in enumerate(videos):
            if v in first_of:
                # Names key the ambiguous segments, the evaluation and the checkpoint's videos.
                fail("videoname.npy", f"video {i} repeats the name {v!r} of video {first_of[v]}")
            first_of[v] = i

        labels = np.zeros((n, len(classes)), dtype=np.float32)
        for i, names in enumerate(arrays["labels_all"]):
            for c in _names(names):
                if c not in index:
                    fail("labels_all.npy", f"video {i} ({videos[i]}): class {c!r} is not in classlist.npy")
                labels[i, index[c]] = 1.0

        segments, segment_classes = [], []
        for i, (segs, labs) in enumerate(zip(arrays["segments"], arrays["labels"])):
            try:
                if _holds_text(segs):  # numpy would parse "1.5"
                    raise TypeError
                segs = np.asarray(list(segs) if not isinstance(segs, np.ndarray) else segs, dtype=np.float64)
            except (TypeError, ValueError):
                fail("segments.npy", f"video {i} ({videos[i]}): expected [start, end] pairs in seconds (numbers)")
            if segs.size == 0 or segs.shape == (2,):  # no segment, or a single pair stored flat
                segs = segs.reshape(-1, 2)
            if segs.ndim != 2 or segs.shape[1] != 2:
                fail("segments.npy", f"video {i} ({videos[i]}): expected [start, end] pairs in seconds, got shape {segs.shape}")
            labs = _names(labs)
            if len(labs) != len(segs):
                fail("labels.npy", f"video {i} ({videos[i]}): {len(labs)} segment labels for {len(segs)} segments in segments.npy")
            if len(segs) and not (np.isfinite(segs).all() and (segs[:, 1] >= segs[:, 0]).all()):
                fail("segments.npy", f"video {i} ({videos[i]}): segments must be finite with end >= start")
            if len(segs) and (segs[:, 0] < 0).any():
                # Seconds from the video's start: a negative one is a broken annotation (a sign
                # or offset error), which would only be counted as a segment never found.
                first = segs[int(np.flatnonzero(segs[:, 0] < 0)[0])].tolist()
                fail("segments.npy", f"video {i} ({videos[i]}): segment {first} starts before the video (negative seconds)")
            for c in labs:
                if c not in index:
                    fail("labels.npy", f"video {i} ({videos[i]}): class {c!r} is not in classlist.npy")
            segments.append(segs)
            segment_classes.append(np.asarray([index[c] for c in labs], dtype=np.int64))

        try:
            if _holds_text(durations):  # float() would parse "30.5"
                raise TypeError
            durations = np.asarray([float(np.asarray(d).reshape(-1)[0]) for d in durations], dtype=np.float64)
        except (TypeError, ValueError, IndexError):
            fail("duration.npy", "expected one number per video")
        if not (np.isfinite(durations) & (durations >= 0)).all():
            i = int(np.flatnonzero(~(np.isfinite(durations) & (durations >= 0)))[0])
            fail("duration.npy", f"video {i} ({videos[i]}): duration {durations[i]} is not a finite, non-negative number of seconds")

        ambiguous = [(str(v), float(s), float(e)) for v, s, e in arrays.get("ambiguous", [])]
        return cls(name, classes, videos, subsets, features, labels, segments, segment_classes, durations, ambiguous, source)

    # -- splits ---------------------------------------------------------------------------

    def split_names(self):
        """(train subset name, test subset name): THUMOS14 trains on "validation" and tests on
        "test"; ActivityNet1.2 trains on "training" and tests on "validation". A folder holding
        neither "test" nor "training" takes ``known_splits`` where it is set."""
        present = set(self.subsets)
        if "test" in present:
            return "validation", "test"
        if "training" in present:
            return "training", "validation"
        if self.known_splits is not None:
            # "validation" alone: THUMOS14's training split or ActivityNet1.2's test split.
            return tuple(self.known_splits)
        raise DataError(
            f"{self.source or self.name}/subset.npy: cannot tell the splits apart: expected 'validation' and 'test' "
            f"(THUMOS14) or 'training' and 'validation' (ActivityNet1.2), got {', '.join(sorted(present))}"
        )

    def indices(self, split):
        """Video indices of ``split``: "train" or "test" (mapped to subset names), or a subset name."""
        if split in ("train", "test"):
            train_name, test_name = self.split_names()
            split = train_name if split == "train" else test_name
        found = [i for i, s in enumerate(self.subsets) if s == split]
        if not found:
            raise DataError(f"{self.source or self.name}/subset.npy: no video in subset {split!r}")
        return found

    def check_train_split(self):
        """Raise a ``DataError`` if no training video has a label: there is nothing to learn."""
        train = self.indices("train")
        if not self.labels[train].any():
            raise DataError(
                f"{os.path.join(self.source or self.name, 'labels_all.npy')}: no video of the "
                f"{self.split_names()[0]!r} split has a label ({len(train)} videos); there is nothing to train on"
            )

    def check_test_split(self):
        """Raise a ``DataError`` if the test split cannot be evaluated: MMSD's protocol needs at
        least one ground-truth segment (detection mAP) and one video-level label (cmAP) there."""
        test = self.indices("test")
        name = self.split_names()[1]
        where = self.source or self.name
        if not any(len(self.segments[i]) for i in test):
            raise DataError(
                f"{os.path.join(where, 'segments.npy')}: no ground-truth segment in the {name!r} split "
                f"({len(test)} videos); detection mAP cannot be evaluated"
            )
        if not self.labels[test].any():
            raise DataError(
                f"{os.path.join(where, 'labels_all.npy')}: no video of the {name!r} split has a label; "
                "classification mAP cannot be evaluated"
            )

    def describe(self):
        # Counted, not self.indices: a folder of the test split alone is evaluated (--eval-only).
        train_name, test_name = self.split_names()
        train, test = self.subsets.count(train_name), self.subsets.count(test_name)
        lengths = np.asarray([f.shape[0] for f in self.features])
        text = (
            f"{self.name}: {len(self.videos)} videos ({train} train, {test} test), {self.num_classes} classes, "
            f"features {self.feature_dim}-d, lengths {lengths.min()}..{lengths.max()} (mean {lengths.mean():.0f})"
        )
        # Videos of any other subset (a misspelt split name, a third split) are in neither
        # split: said here, in the log's second line, rather than dropped without a word.
        others = sorted(set(self.subsets) - set(self.split_names()))
        if others:
            count = len(self.videos) - train - test
            text += f"; {count} videos of subset {', '.join(repr(o) for o in others)} are in neither split"
        return text + "".join("; " + note for note in self.notes())

    def notes(self):
        """What the files allow but may not mean (loaded as they are, and said in the log's
        description line): ground truth past a video's end (annotations rounded up), segment
        classes missing from a video's labels_all (training learns from labels_all alone),
        ambiguous segments of videos not in the dataset (never used)."""
        out = []
        past = [(i, float(seg[:, 1].max()) - self.durations[i]) for i, seg in enumerate(self.segments)
                if len(seg) and seg[:, 1].max() > self.durations[i]]
        if past:
            count = sum(int((self.segments[i][:, 1] > self.durations[i]).sum()) for i, _ in past)
            worst = max(past, key=lambda p: p[1])
            out.append(
                f"{count} ground-truth segment{'s' if count > 1 else ''} of {len(past)} video{'s' if len(past) > 1 else ''} "
                f"end{'' if count > 1 else 's'} past {'their' if count > 1 else 'its'} video's duration (by up to {worst[1]:.3g} s, in {self.videos[worst[0]]})"
            )
        unlabelled = [i for i, classes in enumerate(self.segment_classes) if len(classes) and not self.labels[i, classes].all()]
        if unlabelled:
            out.append(
                f"{len(unlabelled)} video{'s' if len(unlabelled) > 1 else ''} ({self.videos[unlabelled[0]]}"
                f"{', ...' if len(unlabelled) > 1 else ''}) {'have' if len(unlabelled) > 1 else 'has'} segments of classes "
                "missing from labels_all.npy, which training takes its video labels from"
            )
        known = set(self.videos)
        unknown = sorted({v for v, _, _ in self.ambiguous if v not in known})
        if unknown:
            out.append(
                f"{AMBIGUOUS_FILE} names {len(unknown)} video{'s' if len(unknown) > 1 else ''} not in the dataset "
                f"({unknown[0]}{', ...' if len(unknown) > 1 else ''})"
            )
        return out


def _name_of(value, fail, file, i):
    """A video's name or subset as text; anything else (a list, a number, None: a pickle of
    the wrong thing) fails naming ``file`` and the video."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if not isinstance(value, (str, bytes, np.str_, np.bytes_)):
        fail(file, f"video {i}: expected a name (str or bytes), got {type(value).__name__} {value!r:.60}")
    return _text(value)


def _ndim(value):
    """np.ndim, where a pickled Python list counts as 1-d (np.ndim of a ragged one raises)."""
    return 1 if isinstance(value, (list, tuple)) else np.ndim(value)


def _names(value):
    """A per-video list of class names as stored (list, array, a single name, or empty)."""
    if value is None:
        return []
    if isinstance(value, (str, bytes, np.str_, np.bytes_)):
        return [_text(value)]
    try:
        items = list(value)
    except TypeError:
        return [_text(value)]
    if items and isinstance(items[0], float) and math.isnan(items[0]):
        return []
    return [_text(v) for v in items]


def collate(data, video_indices, device=None):
    """A padded batch: ``features`` [B, T, D] float32 (zeros past each length), ``lengths`` [B]
    int64, ``labels`` [B, C] float32, ``index`` [B] int64 (the dataset's video indices)."""
    feats = [data.features[i] for i in video_indices]
    lengths = torch.tensor([f.shape[0] for f in feats], dtype=torch.int64)
    batch = torch.zeros(len(feats), int(lengths.max()), data.feature_dim, dtype=torch.float32)
    for b, f in enumerate(feats):
        batch[b, : f.shape[0]] = torch.from_numpy(f)
    out = {
        "features": batch,
        "lengths": lengths,
        "labels": torch.from_numpy(data.labels[list(video_indices)]),
        "index": torch.tensor(list(video_indices), dtype=torch.int64),
    }
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    return out
