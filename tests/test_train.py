"""The training layer: data loading, model masking, losses against MMSD's per-video formulas,
the main job end to end (train, resume, eval-only, DDP with 2 processes, bad flags).

Everything runs on a tiny synthetic dataset written in the W-TALC layout, so the loader is
exercised too.
"""

import dataclasses
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import types
import warnings

import numpy as np
import pytest
import torch

import mmsd_ext
from mmsd_ext.train import data as data_mod
from mmsd_ext.train import engine, losses, synthetic
from mmsd_ext.train.__main__ import MAX_THREADS, _tious, main
from mmsd_ext.train.model import MMSD, fuse

# ---------------------------------------------------------------------------------------------
# A tiny dataset in the W-TALC layout
# ---------------------------------------------------------------------------------------------

TINY = dict(num_classes=4, modality_dim=8, num_train=12, num_test=6, min_length=12, max_length=60)
# Flags for a fast run on the tiny dataset (it is read from files, so MMSD's THUMOS defaults
# apply: override the size-related ones). On the CPU even where there is a GPU: several tests
# compare runs bit for bit, and the engine asks for deterministic algorithms on the CPU only.
FAST = ["--dataset", "Synthetic", "--embed-dim", "16", "--batch-size", "4", "--lr", "1e-3", "--no-progress", "--quiet",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    synthetic.write(str(root), seed=3, **TINY)
    return str(root)


def _copy_dataset(tiny_root, tmp_path):
    dst = tmp_path / "root"
    shutil.copytree(tiny_root, dst)
    return dst, dst / "Synthetic"


# -- loader ------------------------------------------------------------------------------------


def test_loader_edges_of_durations_segments_and_text(tiny_root, tmp_path):
    # From a mutation round, each at the edge of a check: a duration of 0 s is a duration
    # (non-negative); a segment ending exactly at its video's end is no note; a numpy str array
    # of segment seconds is text (numpy would parse it).
    root, folder = _copy_dataset(tiny_root, tmp_path)
    durations = np.load(folder / "duration.npy", allow_pickle=True)
    segments = np.load(folder / "segments.npy", allow_pickle=True)
    assert data_mod.load_wtalc(str(root), "Synthetic").notes() == []
    i = next(j for j, seg in enumerate(segments) if len(seg))
    durations[i] = float(np.max(np.asarray(segments[i], dtype=np.float64).reshape(-1, 2)[:, 1]))  # ends exactly at its end
    np.save(folder / "duration.npy", durations, allow_pickle=True)
    loaded = data_mod.load_wtalc(str(root), "Synthetic")
    assert loaded.notes() == [], loaded.notes()
    durations[i] = 0.0
    np.save(folder / "duration.npy", durations, allow_pickle=True)
    assert data_mod.load_wtalc(str(root), "Synthetic").durations[i] == 0.0
    segments[i] = np.asarray(segments[i], dtype=np.float64).astype(str)
    np.save(folder / "segments.npy", segments, allow_pickle=True)
    with pytest.raises(data_mod.DataError, match=re.escape(f"video {i} ({loaded.videos[i]}): expected [start, end] pairs in seconds (numbers)")):
        data_mod.load_wtalc(str(root), "Synthetic")


def test_videos_of_other_subsets_are_named_in_the_description(tiny_root, tmp_path):
    root, folder = _copy_dataset(tiny_root, tmp_path)
    subsets = np.load(folder / "subset.npy", allow_pickle=True)
    assert "neither split" not in data_mod.load_wtalc(str(root), "Synthetic").describe()
    subsets[:2] = b"Validation"  # a misspelt split name
    np.save(folder / "subset.npy", subsets)
    text = data_mod.load_wtalc(str(root), "Synthetic").describe()
    assert f"({TINY['num_train'] - 2} train, {TINY['num_test']} test)" in text
    assert text.endswith("; 2 videos of subset 'Validation' are in neither split")


def test_description_notes_what_the_files_allow_but_may_not_mean(tiny_root, tmp_path):
    # Loaded as they are (real annotations hold such things), but said in the log's second line;
    # before 2026-11-29 nothing said them.
    root, folder = _copy_dataset(tiny_root, tmp_path)
    assert data_mod.load_wtalc(str(root), "Synthetic").notes() == []
    names = [v.decode() for v in np.load(folder / "videoname.npy")]
    durations = np.load(folder / "duration.npy")
    segments = np.load(folder / "segments.npy", allow_pickle=True)
    labels = np.load(folder / "labels.npy", allow_pickle=True)
    labels_all = np.load(folder / "labels_all.npy", allow_pickle=True)
    with_gt = [i for i in range(len(segments)) if len(segments[i])]
    first, second = with_gt[:2]
    segments[first] = [list(s) for s in segments[first]]
    segments[first][0][1] = float(durations[first]) + 1.5
    np.save(folder / "segments.npy", segments, allow_pickle=True)
    classes = [c.decode() for c in np.load(folder / "classlist.npy")]
    missing = next(c for c in classes if c not in {_text(x) for x in labels_all[second]})
    labels[second] = [missing] + list(labels[second])[1:]
    np.save(folder / "labels.npy", labels, allow_pickle=True)
    with open(folder / "Ambiguous_test.txt", "a") as f:
        f.write("video_not_here  1.0 2.0\n")
    data = data_mod.load_wtalc(str(root), "Synthetic")
    notes = data.notes()
    assert notes == [
        f"1 ground-truth segment of 1 video ends past its video's duration (by up to 1.5 s, in {names[first]})",
        f"1 video ({names[second]}) has segments of classes missing from labels_all.npy, which training takes its video labels from",
        "Ambiguous_test.txt names 1 video not in the dataset (video_not_here)",
    ]
    assert data.describe().endswith("; " + "; ".join(notes))


def _text(x):
    return x.decode() if isinstance(x, bytes) else str(x)


def test_loader_reads_what_was_written(tiny_root):
    loaded = data_mod.load_wtalc(tiny_root, "Synthetic")
    arrays = synthetic.make_arrays(3, **TINY)
    assert len(loaded.videos) == TINY["num_train"] + TINY["num_test"]
    assert loaded.feature_dim == 2 * TINY["modality_dim"] and loaded.num_classes == TINY["num_classes"]
    for got, want in zip(loaded.features, arrays["features"]):
        np.testing.assert_array_equal(got, want)
    assert loaded.indices("train") == list(range(TINY["num_train"]))
    assert loaded.indices("test") == list(range(TINY["num_train"], len(loaded.videos)))
    for i, names in enumerate(arrays["labels_all"]):
        assert {loaded.classes[c] for c in np.flatnonzero(loaded.labels[i])} == set(names)
    # Ground truth in seconds: round(seconds * 25 / 16) gives back the generator's snippet bounds.
    for i, segments in enumerate(arrays["segments"]):
        np.testing.assert_array_equal(loaded.segments[i], np.asarray(segments).reshape(-1, 2))
        snippets = loaded.segments[i] * 25 / 16
        np.testing.assert_allclose(snippets, np.round(snippets), atol=1e-9)
        assert [loaded.classes[c] for c in loaded.segment_classes[i]] == list(arrays["labels"][i])
    # Ambiguous segments come from the text file (name, two spaces, start end).
    assert [a[0] for a in loaded.ambiguous] == [a[0] for a in arrays["ambiguous"]]


def test_loader_accepts_python2_style_bytes_labels(tiny_root, tmp_path):
    _, folder = _copy_dataset(tiny_root, tmp_path)
    labels = np.load(folder / "labels_all.npy", allow_pickle=True)
    as_bytes = np.empty(len(labels), dtype=object)
    for i, names in enumerate(labels):
        as_bytes[i] = [n.encode() for n in names]
    np.save(folder / "labels_all.npy", as_bytes, allow_pickle=True)
    loaded = data_mod.load_wtalc(str(folder.parent), "Synthetic")
    reference = data_mod.load_wtalc(tiny_root, "Synthetic")
    np.testing.assert_array_equal(loaded.labels, reference.labels)


@pytest.mark.parametrize(
    "damage, file, message",
    [
        ("remove", "segments.npy", "file not found"),
        ("remove", "Synthetic-I3D-JOINTFeatures.npy", "file not found"),
        ("garbage", "labels_all.npy", "cannot be read"),
        ("truncate", "Synthetic-I3D-JOINTFeatures.npy", "cannot be read"),
        ("short", "videoname.npy", "entries"),
        ("unknown_class", "labels_all.npy", "not in classlist"),
        ("segment_count", "labels.npy", "segment labels for"),
        ("bad_features", "Synthetic-I3D-JOINTFeatures.npy", "expected a [T, D] array"),
        ("nan_features", "Synthetic-I3D-JOINTFeatures.npy", "video 1 (video_validation_0000001): features hold NaN or inf"),
        ("repeated_class", "classlist.npy", "class 'class_00_appearance' is listed more than once (at 0, 3)"),
        # a pickled list of lists: it loaded as "0 videos (12 train, 6 test)", or crashed
        ("list_names", "videoname.npy", "video 0: expected a name (str or bytes), got list []"),
        ("list_names", "subset.npy", "video 0: expected a name (str or bytes), got list []"),
        ("odd_dim", "Synthetic-I3D-JOINTFeatures.npy", "odd"),
        ("bad_ambiguous", "Ambiguous_test.txt", "line 1"),
        ("zero_d", "labels_all.npy", "0-d array"),
        ("zero_d", "segments.npy", "0-d array"),
        ("zero_d", "labels.npy", "0-d array"),
        ("zero_d", "videoname.npy", "0-d array"),
        ("zero_d", "subset.npy", "0-d array"),
        ("zero_d", "Synthetic-I3D-JOINTFeatures.npy", "0-d array"),
        # a pickle of one object (np.save of a dict or a str) was "a 0-d array" and no more
        ("dict_saved", "Synthetic-I3D-JOINTFeatures.npy",
         "expected an array with one entry per video, got a 0-d array holding dict {'video_0': array("),
        ("str_saved", "classlist.npy", "expected an array with one entry per class, got a 0-d array holding str 'BaseballPitch'"),
        ("two_columns", "classlist.npy", "expected a 1-d array of class names, got shape (4, 2)"),
        ("zero_width", "Synthetic-I3D-JOINTFeatures.npy", "feature dimension 0"),
        ("two_columns", "subset.npy", "expected a 1-d array"),
        ("two_columns", "videoname.npy", "expected a 1-d array"),
        ("segment_width", "segments.npy", "got shape (2, 3)"),
        ("complex_features", "Synthetic-I3D-JOINTFeatures.npy", "video 1 (video_validation_0000001): features are not real numbers"),
        ("string_features", "Synthetic-I3D-JOINTFeatures.npy", "video 1 (video_validation_0000001): features are not real numbers"),
        ("object_string_features", "Synthetic-I3D-JOINTFeatures.npy", "video 1 (video_validation_0000001): features are not real numbers"),
        # a mask or a thresholded copy saved in place of the features: True/False are not features
        ("bool_features", "Synthetic-I3D-JOINTFeatures.npy", "video 1 (video_validation_0000001): features are booleans, not real numbers"),
        ("object_bool_features", "Synthetic-I3D-JOINTFeatures.npy", "video 1 (video_validation_0000001): features are booleans, not real numbers"),
        ("duplicate_name", "videoname.npy", "video 5 repeats the name"),
        ("ambiguous_dir", "Ambiguous_test.txt", "expected a text file"),
        ("nan_ambiguous", "Ambiguous_test.txt", "line 1"),
        ("long_ambiguous", "Ambiguous_test.txt", "line 1"),
        ("empty_video", "Synthetic-I3D-JOINTFeatures.npy", "video 1 (video_validation_0000001): expected a [T, D] array with T >= 1"),
        ("negative_segment", "segments.npy", "video 13 (video_test_0000013): segment [-0.5, 2.0] starts before the video"),
        ("nan_duration", "duration.npy", "video 4 (video_validation_0000004): duration nan is not a finite, non-negative"),
        ("negative_duration", "duration.npy", "duration -4.0 is not a finite, non-negative number of seconds"),
        ("duration_pairs", "duration.npy", "expected one number per video (18), got shape (18, 2)"),
        # numpy parsed numbers written as text
        ("text_segment", "segments.npy", "video 13 (video_test_0000013): expected [start, end] pairs in seconds (numbers)"),
        ("text_duration", "duration.npy", "expected one number per video"),
    ],
)
def test_loader_names_the_bad_file(tiny_root, tmp_path, damage, file, message):
    root, folder = _copy_dataset(tiny_root, tmp_path)
    path = folder / file
    if damage == "remove":
        path.unlink()
    elif damage == "garbage":
        path.write_bytes(b"this is not a numpy file")
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "short":
        np.save(path, np.load(path, allow_pickle=True)[:-1])
    elif damage == "unknown_class":
        labels = np.load(path, allow_pickle=True)
        labels[2] = ["no_such_class"]
        np.save(path, labels, allow_pickle=True)
    elif damage == "segment_count":
        labels = np.load(path, allow_pickle=True)
        labels[1] = list(labels[1]) + list(labels[1])
        np.save(path, labels, allow_pickle=True)
    elif damage in ("bad_features", "nan_features", "odd_dim"):
        feats = np.load(path, allow_pickle=True)
        if damage == "bad_features":
            feats[1] = feats[1][:, 0]
        elif damage == "nan_features":
            feats[1] = feats[1].copy()
            feats[1][0, 0] = np.nan
        else:
            for i in range(len(feats)):
                feats[i] = feats[i][:, :-1]
        np.save(path, feats, allow_pickle=True)
    elif damage == "bad_ambiguous":
        path.write_text("video_test_0000001  1.0\n")
    elif damage == "zero_d":
        np.save(path, np.array(5))
    elif damage == "zero_width":
        feats = np.load(path, allow_pickle=True)
        for i in range(len(feats)):
            feats[i] = feats[i][:, :0]
        np.save(path, feats, allow_pickle=True)
    elif damage == "dict_saved":
        np.save(path, {"video_0": np.zeros((3, 4))}, allow_pickle=True)
    elif damage == "str_saved":
        np.save(path, "BaseballPitch")
    elif damage == "two_columns":
        names = np.load(path)
        np.save(path, np.stack([names, names[::-1]], 1))
    elif damage == "segment_width":
        segments = np.load(path, allow_pickle=True)
        segments[13] = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
        np.save(path, segments, allow_pickle=True)
    elif damage in ("complex_features", "string_features", "object_string_features", "bool_features",
                    "object_bool_features"):
        # numpy would drop the imaginary part with a warning, and parse the strings.
        feats = np.load(path, allow_pickle=True)
        feats[1] = {"complex_features": feats[1] + 0j, "string_features": feats[1].astype(str),
                    "object_string_features": feats[1].astype(str).astype(object),
                    "bool_features": feats[1] > 0,
                    "object_bool_features": (feats[1] > 0).astype(object)}[damage]
        np.save(path, feats, allow_pickle=True)
    elif damage == "duplicate_name":
        names = np.load(path)
        names[5] = names[2]
        np.save(path, names)
    elif damage == "list_names":
        count = len(np.load(path, allow_pickle=True))
        with open(path, "wb") as f:
            pickle.dump([[] for _ in range(count)], f)
    elif damage == "repeated_class":
        classes = np.load(path)
        classes[3] = classes[0]
        np.save(path, classes)
    elif damage == "ambiguous_dir":
        path.unlink()
        path.mkdir()
    elif damage == "nan_ambiguous":
        path.write_text("video_test_0000001  nan 9.6\n")
    elif damage == "long_ambiguous":
        path.write_text("video_test_0000001  1.0 2.0 3.0\n")
    elif damage == "negative_segment":
        segments = np.load(path, allow_pickle=True)
        segments[13] = [[1.0, 2.0], [-0.5, 2.0]]
        labels = np.load(folder / "labels.npy", allow_pickle=True)
        labels[13] = [labels[13][0]] * 2
        np.save(folder / "labels.npy", labels, allow_pickle=True)
        np.save(path, segments, allow_pickle=True)
    elif damage == "text_segment":
        segments = np.load(path, allow_pickle=True)
        segments[13] = [["1.0", "2.0"]] + [list(s) for s in segments[13]][1:]
        np.save(path, segments, allow_pickle=True)
    elif damage == "text_duration":
        durations = np.load(path, allow_pickle=True).astype(object)
        durations[4] = "30.5"
        np.save(path, durations, allow_pickle=True)
    elif damage in ("nan_duration", "negative_duration", "duration_pairs"):
        durations = np.load(path, allow_pickle=True).astype(np.float64)
        if damage == "duration_pairs":
            durations = np.stack([durations, durations], 1)
        else:
            durations[4] = np.nan if damage == "nan_duration" else -4.0
        np.save(path, durations)
    elif damage == "empty_video":
        feats = np.load(path, allow_pickle=True)
        feats[1] = feats[1][:0]
        np.save(path, feats, allow_pickle=True)
    with pytest.raises(data_mod.DataError) as info:
        data_mod.load_wtalc(str(root), "Synthetic")
    assert file in str(info.value) and message in str(info.value)
    assert str(info.value).startswith(f"{path}: ") and str(info.value).count(file) == 1, info.value


def test_loader_refuses_wide_features_beyond_float32_without_a_warning(tiny_root, tmp_path):
    """Finite float64 features too large for float32 were said to "hold NaN or inf" (the cast made
    them inf), and numpy's "overflow encountered in cast" warning leaked; float64 features within
    float32's range load as their float32 values."""
    import warnings

    root, folder = _copy_dataset(tiny_root, tmp_path)
    path = folder / "Synthetic-I3D-JOINTFeatures.npy"
    feats = np.load(path, allow_pickle=True)
    for i in range(len(feats)):
        feats[i] = feats[i].astype(np.float64)
    np.save(path, feats, allow_pickle=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = data_mod.load_wtalc(str(root), "Synthetic")
        assert all(f.dtype == np.float32 for f in loaded.features)
        assert all(np.array_equal(a, b) for a, b in zip(loaded.features, data_mod.load_wtalc(tiny_root, "Synthetic").features))
        feats[1] = feats[1] * 1e300
        np.save(path, feats, allow_pickle=True)
        with pytest.raises(data_mod.DataError) as info:
            data_mod.load_wtalc(str(root), "Synthetic")
    message = str(info.value)
    assert message.startswith(f"{path}: video 1 (video_validation_0000001): features reach ") and "beyond float32's range (+-3.403e+38)" in message, message
    assert "NaN" not in message


@pytest.mark.parametrize("file", ["labels_all.npy", "segments.npy", "labels.npy", "Synthetic-I3D-JOINTFeatures.npy"])
def test_loader_reads_plain_pickled_lists(tiny_root, tmp_path, file):
    """A file holding a pickled Python list (ragged), not an object array, reads as the array
    would (np.ndim of a ragged list raised numpy's "inhomogeneous shape" error)."""
    root, folder = _copy_dataset(tiny_root, tmp_path)
    values = np.load(folder / file, allow_pickle=True)
    with open(folder / file, "wb") as f:
        pickle.dump([list(v) if file != "Synthetic-I3D-JOINTFeatures.npy" else v for v in values], f)
    loaded = data_mod.load_wtalc(str(root), "Synthetic")
    reference = data_mod.load_wtalc(tiny_root, "Synthetic")
    np.testing.assert_array_equal(loaded.labels, reference.labels)
    for got, want in zip(loaded.segments + loaded.features, reference.segments + reference.features):
        np.testing.assert_array_equal(got, want)


class _Python2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 wrote its str (SHORT_BINSTRING / BINSTRING), which Python 3
    reads back as text in the ``encoding`` given to the unpickler: how a numpy array's raw
    data sits in a pickle made by Python 2."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_bytes_as_str(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + len(obj).to_bytes(4, "little") + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_bytes_as_str


def _save_as_python2(path, array):
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|O", "fortran_order": False, "shape": array.shape})
        _Python2Pickler(f, protocol=2).dump(array)


def test_loader_reads_object_arrays_pickled_by_python2(tiny_root, tmp_path):
    # W-TALC's files were written by Python 2 (its loader passes encoding="bytes"): the raw data
    # of each feature array is a Python 2 str, which numpy >= 2 fails to read as ASCII with a
    # UnicodeError (not the UnicodeDecodeError the loader caught), so the latin-1 retry never ran.
    root, folder = _copy_dataset(tiny_root, tmp_path)
    features = folder / "Synthetic-I3D-JOINTFeatures.npy"
    reference = data_mod.load_wtalc(tiny_root, "Synthetic")
    _save_as_python2(features, np.load(features, allow_pickle=True))
    with pytest.raises(UnicodeError):
        np.load(features, allow_pickle=True)  # as the loader's first try reads it
    loaded = data_mod.load_wtalc(str(root), "Synthetic")
    for got, want in zip(loaded.features, reference.features):
        np.testing.assert_array_equal(got, want)
    # Names pickled by Python 2 as str, UTF-8 and latin-1 bytes among them, as the names of
    # files written by Python 3 are read (a latin-1 reading of the whole file made "cafÃ©").
    names = np.load(folder / "videoname.npy").astype(object)
    names[3], names[4] = "vid\u00e9o_3".encode(), b"vid\xe9o_4"
    _save_as_python2(folder / "videoname.npy", np.array([n if isinstance(n, bytes) else n.encode() for n in names], dtype=object))
    loaded = data_mod.load_wtalc(str(root), "Synthetic")
    assert loaded.videos[3] == "vid\u00e9o_3" and loaded.videos[4] == "vid\u00e9o_4" and loaded.videos[0] == reference.videos[0]


def test_loader_decodes_latin1_names(tiny_root, tmp_path):
    """Names that are not UTF-8 (Python 2 tools wrote latin-1) are read as latin-1."""
    root, folder = _copy_dataset(tiny_root, tmp_path)
    classes = list(np.load(folder / "classlist.npy"))
    np.save(folder / "classlist.npy", np.array(classes + [b"caf\xe9"]))
    names = np.load(folder / "videoname.npy").astype("S40")
    names[3] = b"vid\xe9o_3"
    np.save(folder / "videoname.npy", names)
    loaded = data_mod.load_wtalc(str(root), "Synthetic")
    assert loaded.classes[-1] == "caf\u00e9" and loaded.videos[3] == "vid\u00e9o_3"


def test_loader_reads_point_segments_nan_labels_and_activitynet_splits(tiny_root, tmp_path):
    root, folder = _copy_dataset(tiny_root, tmp_path)
    segments = np.load(folder / "segments.npy", allow_pickle=True)
    v = next(i for i, segs in enumerate(segments) if len(segs))
    segments[v] = [[5.0, 5.0]] + [list(x) for x in segments[v][1:]]  # end == start is a segment
    np.save(folder / "segments.npy", segments, allow_pickle=True)
    labels_all = np.load(folder / "labels_all.npy", allow_pickle=True)
    labels_all[3] = [np.nan]  # an empty pandas cell: no labels
    np.save(folder / "labels_all.npy", labels_all, allow_pickle=True)
    subsets = np.load(folder / "subset.npy", allow_pickle=True)
    renamed = np.array([{"validation": "training", "test": "validation"}[data_mod._text(x)] for x in subsets])
    np.save(folder / "subset.npy", renamed)

    before = data_mod.load_wtalc(tiny_root, "Synthetic")
    d = data_mod.load_wtalc(str(root), "Synthetic")
    assert d.segments[v][0].tolist() == [5.0, 5.0]
    assert not d.labels[3].any() and before.labels[3].any()
    assert d.split_names() == ("training", "validation")
    assert d.indices("train") == before.indices("train") and d.indices("test") == before.indices("test")


def test_loader_missing_folder(tmp_path):
    with pytest.raises(data_mod.DataError, match="is not a directory"):
        data_mod.load_wtalc(str(tmp_path / "nowhere"), "Thumos14reduced")
    with pytest.raises(data_mod.DataError, match="^--data-root: empty path$"):
        data_mod.load_wtalc("", "Thumos14reduced")
    with pytest.raises(data_mod.DataError, match="no such dataset folder"):
        data_mod.load_wtalc(str(tmp_path), "Thumos14reduced")


def test_loader_a_directory_in_place_of_a_file(tiny_root, tmp_path):
    root, folder = _copy_dataset(tiny_root, tmp_path)
    (folder / "segments.npy").unlink()
    (folder / "segments.npy").mkdir()
    with pytest.raises(data_mod.DataError, match=r"segments\.npy: expected a \.npy file, got a directory"):
        data_mod.load_wtalc(str(root), "Synthetic")


def test_synthetic_is_deterministic_and_varied():
    a = synthetic.make_arrays(5, **TINY)
    b = synthetic.make_arrays(5, **TINY)
    c = synthetic.make_arrays(6, **TINY)
    for x, y in zip(a["features"], b["features"]):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a["features"][0][:12], c["features"][0][:12])  # min_length is 12
    full = synthetic.synthetic_dataset(0)
    lengths = [f.shape[0] for f in full.features]
    assert 50 <= min(lengths) and max(lengths) <= 800 and max(lengths) - min(lengths) > 500
    assert (full.labels.sum(1) > 1).any() and (full.labels.sum(1) == 1).any()  # multi-label videos
    assert full.feature_dim == 512 and full.num_classes == 8


def test_synthetic_modalities_are_complementary():
    """Appearance (even) classes show mainly in the RGB half, motion (odd) classes in flow."""
    d = synthetic.synthetic_dataset(0)
    F = d.feature_dim // 2
    gain = {0: [], 1: []}
    for i in d.indices("train"):
        f = d.features[i]
        inside = np.zeros(len(f), bool)
        for s, e in np.round(d.segments[i] * 25 / 16).astype(int):
            inside[s:e] = True
        if len(set(d.segment_classes[i] % 2)) != 1 or inside.all():
            continue
        shift = f[inside].mean(0) - f[~inside].mean(0)
        gain[int(d.segment_classes[i][0] % 2)].append(np.linalg.norm(shift[:F]) / np.linalg.norm(shift[F:]))
    # Noise and the background difference dilute the 0.8 : 0.45 ratio of the patterns.
    assert np.median(gain[0]) > 1.15 and np.median(gain[1]) < 1 / 1.15


def test_evaluation_of_a_perfect_cas_is_perfect(tiny_root, monkeypatch):
    """The glue between predictions, the protocol and the ground truth: the CAS of the ground
    truth itself scores 100 at every tIoU."""
    d = data_mod.load_wtalc(tiny_root, "Synthetic")
    test = d.indices("test")

    def oracle(model, data, indices, device, batch_size=16, progress=False, desc="eval"):
        lengths = torch.tensor([data.features[i].shape[0] for i in indices])
        cas = torch.zeros(len(indices), int(lengths.max()), data.num_classes)
        for v, i in enumerate(indices):
            for (s, e), c in zip(np.round(data.segments[i] * 25 / 16).astype(int), data.segment_classes[i]):
                cas[v, s:e, c] = 1.0
        return cas, torch.from_numpy(data.labels[indices]), lengths

    monkeypatch.setattr(engine, "predict", oracle)
    result = engine.evaluate(None, d, test, torch.device("cpu"), engine.Config())
    assert result["map"] == {f"{t:.1f}": 100.0 for t in engine.TIOUS} and result["cmap"] == 100.0
    assert result["num_evaluated_videos"] == len(test)


def test_collate_pads_with_zeros(tiny_root):
    d = data_mod.load_wtalc(tiny_root, "Synthetic")
    batch = data_mod.collate(d, [0, 3, 5])
    lengths = [d.features[i].shape[0] for i in (0, 3, 5)]
    assert batch["lengths"].tolist() == lengths
    assert batch["features"].shape == (3, max(lengths), d.feature_dim)
    for b, i in enumerate((0, 3, 5)):
        np.testing.assert_array_equal(batch["features"][b, : lengths[b]].numpy(), d.features[i])
        assert not batch["features"][b, lengths[b] :].any()


# -- model and losses --------------------------------------------------------------------------


def _padded_and_single(model, d, videos):
    batch = data_mod.collate(d, videos)
    model.eval()
    with torch.no_grad():
        together = model(batch["features"], batch["lengths"])
        alone = []
        for v in videos:
            single = data_mod.collate(d, [v])
            alone.append(model(single["features"], single["lengths"]))
    return batch, together, alone


def test_padding_changes_nothing(tiny_root):
    """A video's outputs in a padded batch equal its outputs alone (every pooling is masked)."""
    d = data_mod.load_wtalc(tiny_root, "Synthetic")
    torch.manual_seed(0)
    model = MMSD(d.num_classes, modality_dim=d.feature_dim // 2, embed_dim=16)
    videos = [0, 4, 7]
    batch, together, alone = _padded_and_single(model, d, videos)
    for b, out in enumerate(alone):
        L = int(batch["lengths"][b])
        torch.testing.assert_close(together["cas_logits"][:, b, :L], out["cas_logits"][:, 0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(together["attention"][:, b, :L], out["attention"][:, 0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(together["video_logits"][:, b], out["video_logits"][:, 0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(together["mil_logits"][:, b], out["mil_logits"][:, 0], rtol=1e-5, atol=1e-5)
        assert not together["attention"][:, b, L:].any()


def _mmsd_attention_loss_one_video(a, y):
    """MMSD's FrmScrLoss for one video, transcribed: a [T, C+1] = sigmoid(cas_logits), y [C+1]."""
    T = a.shape[0]
    k = max(T // 8, 1)
    top = torch.topk(a, k, dim=0).values.mean(0)
    bottom = -torch.topk(-a, k, dim=0).values.mean(0)
    temporal = ((bottom - top) * y).sum()
    masked = a * y[None]
    separation = -(masked[:, :-1].max(-1).values - masked[:, -1]).abs().mean()
    return temporal + separation


def _mmsd_voting_one_video(conf, plbl, con=0.6, margin=0.3):
    """MMSD's generate_reliable_label for one video, transcribed stream by stream: conf, plbl [3, T]."""
    targets, masks = [], []
    for x in range(3):
        others = [y for y in range(3) if y != x]
        single = [conf[s] >= con for s in range(3)]
        trusted = [((conf[y] - conf[x]) >= margin) & single[y] for y in others]
        mask = single[x] | trusted[0] | trusted[1]
        label = (plbl[x] * single[x] + plbl[others[0]] * trusted[0] + plbl[others[1]] * trusted[1]) / (
            single[x] * 1.0 + trusted[0] * 1.0 + trusted[1] * 1.0 + 1e-4
        )
        targets.append(label)
        masks.append(mask)
    return torch.stack(targets), torch.stack(masks)


def _mmsd_cce(student, teacher, mask=None):
    """MMSD's CategoryCrossEntropy at tau 0.2, the mean over the (valid) snippets."""
    per_row = -(torch.softmax(teacher / 0.2, -1) * torch.log_softmax(student / 0.2, -1)).sum(-1)
    return per_row.mean() if mask is None else per_row[mask].mean()


def test_losses_equal_mmsd_per_video_sum(tiny_root):
    d = data_mod.load_wtalc(tiny_root, "Synthetic")
    torch.manual_seed(1)
    model = MMSD(d.num_classes, modality_dim=d.feature_dim // 2, embed_dim=16)
    videos = [1, 2, 6, 9]
    batch, together, alone = _padded_and_single(model, d, videos)
    labels, lengths = batch["labels"], batch["lengths"]
    T = batch["features"].shape[1]
    stored = (torch.rand(3, len(videos), T, generator=torch.Generator().manual_seed(0)) > 0.5).float()

    got_att = losses.attention_loss(together["cas_logits"], labels, lengths, together["mask"], backend="reference")
    got_vote = losses.voting_loss(together["attention"], together["cas_logits"], labels, stored, together["mask"])
    for b, out in enumerate(alone):
        L = int(lengths[b])
        y = torch.cat([labels[b], torch.ones(1)])
        for s in range(3):
            want = _mmsd_attention_loss_one_video(torch.sigmoid(out["cas_logits"][s, 0]), y)
            torch.testing.assert_close(got_att[s, b], want, rtol=1e-5, atol=1e-5)
        p = torch.softmax(out["cas_logits"][:, 0], -1) * y
        conf = (p[..., :-1].sum(-1) - p[..., -1]).abs()
        target, mask = _mmsd_voting_one_video(conf, stored[:, b, :L])
        for s in range(3):
            sq = (out["attention"][s, 0] - target[s]) ** 2
            want = sq[mask[s]].mean() if mask[s].any() else torch.tensor(0.0)
            torch.testing.assert_close(got_vote[s, b], want, rtol=1e-5, atol=1e-6)

    # Distillation of one video equals MMSD's three CategoryCrossEntropy terms (mean over snippets).
    out = alone[0]
    r, f, p = out["cas_logits"][0, 0], out["cas_logits"][1, 0], out["cas_logits"][2, 0]

    got = losses.distill_loss(out["cas_logits"][:, :1], ("rgb", "flow", "fused"), out["mask"])
    want = _mmsd_cce(r, f) + _mmsd_cce(f, r) + _mmsd_cce(p, r / 2 + f / 2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_pseudo_label_refresh_keeps_the_more_confident():
    torch.manual_seed(0)
    S, B, T, C = 3, 2, 6, 3
    outputs = {
        "cas_logits": torch.randn(S, B, T, C + 1) * 3,
        "attention": torch.rand(S, B, T),
        "mask": torch.tensor([[True] * 6, [True] * 4 + [False] * 2]),
    }
    labels = torch.tensor([[1.0, 0, 0], [0, 1.0, 1.0]])
    stored_labels = torch.full((S, B, T), 7.0)
    stored_conf = torch.rand(S, B, T)
    new_labels, new_conf = losses.refresh_pseudo_labels(outputs, labels, stored_labels, stored_conf)
    conf = losses.confidence(outputs["cas_logits"], labels)
    better = (conf > stored_conf) & outputs["mask"][None]
    assert better.any() and (~better).any()
    assert torch.equal(new_labels[better], (outputs["attention"][better] > 0.55).float())
    assert (new_labels[~better] == 7.0).all()
    assert torch.equal(new_conf, torch.where(better, conf, stored_conf))


def _mmsd_normalized_ce(logits, target):
    """MMSD's NormalizedCrossEntropy for one video: logits, target [K]."""
    return -(target / (target.sum() + 1e-8) * torch.log_softmax(logits, -1)).sum()


def test_classification_total_and_weights_equal_mmsd(tiny_root):
    """The classification term (attention branch against [y, 0] at 1.0, MIL branch against
    [y, 1] at 0.5), MMSD's weights on the total (1, 0.1, 0.1, 2), the default distillation
    scale (the batch size) and a weight given by the caller."""
    d = data_mod.load_wtalc(tiny_root, "Synthetic")
    torch.manual_seed(2)
    model = MMSD(d.num_classes, modality_dim=d.feature_dim // 2, embed_dim=16)
    videos = [0, 3, 5]
    batch, together, alone = _padded_and_single(model, d, videos)
    labels, lengths = batch["labels"], batch["lengths"]
    B = len(videos)
    stored = (torch.rand(3, B, batch["features"].shape[1], generator=torch.Generator().manual_seed(1)) > 0.5).float()
    total, parts = losses.mmsd_loss(together, labels, lengths, ("rgb", "flow", "fused"), stored_labels=stored)

    want_cls = torch.tensor(0.0)
    for b, out in enumerate(alone):
        zero, one = torch.cat([labels[b], torch.zeros(1)]), torch.cat([labels[b], torch.ones(1)])
        for s in range(3):
            want_cls = want_cls + _mmsd_normalized_ce(out["video_logits"][s, 0], zero)
            want_cls = want_cls + 0.5 * _mmsd_normalized_ce(out["mil_logits"][s, 0], one)
    torch.testing.assert_close(parts["cls"], want_cls, rtol=1e-5, atol=1e-5)

    mean = losses.distill_loss(together["cas_logits"], ("rgb", "flow", "fused"), together["mask"])
    torch.testing.assert_close(parts["distill"], B * mean)
    assert set(parts) == {"cls", "att", "distill", "voting"}
    want_total = parts["cls"] + 0.1 * parts["att"] + 0.1 * parts["distill"] + 2.0 * parts["voting"]
    torch.testing.assert_close(total.detach(), want_total)

    without, _ = losses.mmsd_loss(
        together, labels, lengths, ("rgb", "flow", "fused"), stored_labels=stored, weights={"distill": 0.0}
    )
    torch.testing.assert_close(without.detach(), want_total - 0.1 * parts["distill"])


def test_two_stream_distillation_is_both_directions():
    torch.manual_seed(3)
    cas = torch.randn(2, 2, 7, 5) * 3
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    got = losses.distill_loss(cas, ("rgb", "flow"), mask)
    want = _mmsd_cce(cas[0], cas[1], mask) + _mmsd_cce(cas[1], cas[0], mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="distillation needs the rgb and flow streams"):
        losses.distill_loss(cas, ("rgb", "fused"), mask)
    # The streams as a list (it compared a list with a tuple and refused them).
    assert torch.equal(losses.distill_loss(cas, ["rgb", "flow"], mask), got)


@pytest.mark.parametrize("streams, error", [(("rgb", "flw"), ValueError), (("RGB",), ValueError), ((), ValueError),
                                            ("rgb", TypeError)])
def test_model_refuses_unknown_stream_names(streams, error):
    # ("rgb", "flw") built an rgb-only model without a word; a str was read letter by letter.
    with pytest.raises(error, match="^streams: expected a"):
        MMSD(3, modality_dim=4, embed_dim=8, streams=streams)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_keeps_padding_out(dtype):
    """A padded video's outputs equal its outputs alone in float16 too: F.normalize's default
    eps, 1e-12, is 0 in float16, and a padded embedding's 0 / 0 was NaN in every pooling."""
    torch.manual_seed(0)
    model = MMSD(3, modality_dim=8, embed_dim=8).to(dtype).eval()
    x = torch.randn(2, 6, 16).to(dtype)
    x[1, 3:] = 0
    with torch.no_grad():
        batched = model(x, torch.tensor([6, 3]))
        alone = model(x[1:, :3], torch.tensor([3]))
    for key in ("video_logits", "mil_logits"):
        assert torch.isfinite(batched[key]).all(), key
        torch.testing.assert_close(batched[key][:, 1], alone[key][:, 0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(batched["cas_logits"][:, 1, :3], alone["cas_logits"][:, 0], rtol=2e-2, atol=2e-2)


def test_attention_loss_ignores_whatever_the_padding_holds():
    """A video's attention loss in a padded batch equals its loss alone, whatever logits the
    padding holds, for a video with labels and one without."""
    torch.manual_seed(4)
    cas = torch.randn(2, 2, 9, 4) * 4
    labels = torch.tensor([[1.0, 0, 1], [0, 0, 0]])
    lengths = torch.tensor([9, 5])
    mask = torch.arange(9)[None] < lengths[:, None]
    together = losses.attention_loss(cas, labels, lengths, mask, backend="reference")
    for b in range(2):
        L = int(lengths[b])
        alone = losses.attention_loss(cas[:, b : b + 1, :L], labels[b : b + 1], lengths[b : b + 1], mask[b : b + 1, :L],
                                      backend="reference")
        torch.testing.assert_close(together[:, b], alone[:, 0])


def test_voting_trusts_at_the_margin_and_never_at_padding():
    # Stream 0 is unsure (0.5); stream 1 is sure (0.75) and exactly the margin (0.25) more
    # confident, so stream 0 takes stream 1's label; stream 2 (0) trusts stream 1 too.
    conf = torch.tensor([0.5, 0.75, 0.0])[:, None, None].expand(3, 1, 2).clone()
    stored = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]])[:, None, :]
    mask = torch.tensor([[True, False]])
    targets, use = losses.voting_targets(conf, stored, mask, margin=0.25)
    assert use[:, 0, 0].tolist() == [True, True, True]
    assert not use[:, 0, 1].any()  # the padded snippet, although every stream is trusted there
    torch.testing.assert_close(targets[:, 0, 0], torch.full((3,), 1 / (1 + 1e-4)))


def test_pseudo_labels_are_not_replaced_at_equal_confidence():
    torch.manual_seed(5)
    outputs = {
        "cas_logits": torch.randn(3, 2, 5, 4),
        "attention": torch.rand(3, 2, 5),
        "mask": torch.ones(2, 5, dtype=torch.bool),
    }
    labels = torch.tensor([[1.0, 0, 1], [0, 1.0, 0]])
    stored = torch.full((3, 2, 5), 7.0)
    conf = losses.confidence(outputs["cas_logits"], labels)
    new_labels, new_conf = losses.refresh_pseudo_labels(outputs, labels, stored, conf.clone())
    assert (new_labels == 7.0).all() and torch.equal(new_conf, conf)


def test_fusion_weights_and_inference_fusion_are_mmsds():
    def weights(streams):
        return MMSD(3, modality_dim=4, embed_dim=8, streams=streams).fusion_weights()

    torch.testing.assert_close(weights(("rgb", "flow", "fused")), torch.tensor([0.2, 0.4, 0.4]))
    torch.testing.assert_close(weights(("rgb", "flow")), torch.tensor([1 / 3, 2 / 3]))
    torch.testing.assert_close(weights(("fused",)), torch.tensor([1.0]))

    torch.manual_seed(6)
    S, B, T, C = 3, 2, 5, 3
    outputs = {
        "cas_logits": torch.randn(S, B, T, C + 1),
        "attention": torch.rand(S, B, T),
        "video_logits": torch.randn(S, B, C + 1),
    }
    w = torch.tensor([0.2, 0.3, 0.5])
    cas, scores = fuse(outputs, w)
    att = sum(w[s] * outputs["attention"][s] for s in range(S))
    probs = sum(w[s] * torch.softmax(outputs["cas_logits"][s], -1) for s in range(S))
    video = sum(w[s] * torch.softmax(outputs["video_logits"][s], -1) for s in range(S))
    torch.testing.assert_close(cas, (probs * att[..., None])[..., :C])
    torch.testing.assert_close(scores, video[:, :C])


def test_each_stream_reads_its_own_half_of_the_features():
    torch.manual_seed(7)
    model = MMSD(3, modality_dim=4, embed_dim=8).eval()
    # The foreground centre starts opposite the background centre.
    torch.testing.assert_close(model.fg_centres.detach(), -model.centres.detach()[:, -1:])
    x = torch.randn(1, 6, 8)
    lengths = torch.tensor([6])
    with torch.no_grad():
        base = model(x, lengths)["cas_logits"]
        new_flow = model(torch.cat([x[..., :4], torch.randn(1, 6, 4)], -1), lengths)["cas_logits"]
        new_rgb = model(torch.cat([torch.randn(1, 6, 4), x[..., 4:]], -1), lengths)["cas_logits"]
    assert torch.equal(new_flow[0], base[0]) and not torch.equal(new_flow[1], base[1])
    assert torch.equal(new_rgb[1], base[1]) and not torch.equal(new_rgb[0], base[0])
    assert not torch.equal(new_flow[2], base[2]) and not torch.equal(new_rgb[2], base[2])


def test_schedules_scale_mmsd():
    assert engine.refresh_epochs(240, 6) == [40, 80, 120, 160, 200]
    assert engine.refresh_epochs(30, 6) == [5, 10, 15, 20, 25]
    assert engine.refresh_epochs(4, 6) == [1, 2, 3]
    config = engine.Config()
    assert engine.learning_rate(config, 69) == 5e-5 and engine.learning_rate(config, 70) == pytest.approx(1e-5)
    assert engine.run_refresh_epochs(config) == [40, 80, 120, 160, 200]
    # The decay epoch is rounded: 10 epochs x 70 / 240 = 2.92 decays from epoch 3 (0-based).
    short = engine.Config(epochs=10)
    assert engine.learning_rate(short, 2) == 5e-5 and engine.learning_rate(short, 3) == pytest.approx(1e-5)
    # Never from the first epoch: 1 x 70 / 240 rounds to 0, which had trained a one-epoch run
    # at 0.2 x --lr throughout; 2 epochs decay from the second.
    assert engine.learning_rate(engine.Config(epochs=1, lr=1e-3), 0) == 1e-3
    assert engine.learning_rate(engine.Config(epochs=1, lr_decay_at=0.01), 0) == 5e-5
    two = engine.Config(epochs=2)
    assert engine.learning_rate(two, 0) == 5e-5 and engine.learning_rate(two, 1) == pytest.approx(1e-5)


def test_a_schedule_length_keeps_decay_and_refreshes_where_the_first_length_put_them():
    longer = engine.Config(epochs=480, schedule_epochs=240)
    assert engine.learning_rate(longer, 69) == 5e-5 and engine.learning_rate(longer, 100) == pytest.approx(1e-5)
    assert engine.run_refresh_epochs(longer) == [40, 80, 120, 160, 200]
    shorter = engine.Config(epochs=100, schedule_epochs=240)
    assert engine.run_refresh_epochs(shorter) == [40, 80]
    assert engine.learning_rate(shorter, 70) == pytest.approx(1e-5)


# -- the main job ------------------------------------------------------------------------------


def _epoch_records(folder):
    with open(os.path.join(folder, "train.log")) as f:
        return [json.loads(line[len("epoch ") :]) for line in f if line.startswith("epoch ")]


def _results(folder):
    with open(os.path.join(folder, "results.json")) as f:
        return json.load(f)


def test_the_environments_backend_is_the_runs_where_no_flag_gives_one(tiny_root, tmp_path, monkeypatch):
    # MMSD_EXT_BACKEND sets the ops' backend for a process: the main job runs on it (and
    # records it) unless --backend is given; it trained on auto before 2026-11-29.
    from mmsd_ext import distill

    calls = []
    reference = distill._MMSD_IMPLS["reference"]
    monkeypatch.setitem(distill._MMSD_IMPLS, "reference", lambda *args: calls.append(1) or reference(*args))
    monkeypatch.setenv("MMSD_EXT_BACKEND", "reference")
    assert main(["--data-root", tiny_root, *FAST, "--epochs", "1", "--output-dir", str(tmp_path / "env")]) == 0
    assert _results(str(tmp_path / "env"))["config"]["backend"] == "reference" and calls
    if "cpu" in mmsd_ext.available_backends():
        calls.clear()
        assert main(["--data-root", tiny_root, *FAST, "--epochs", "1", "--backend", "cpu", "--output-dir", str(tmp_path / "flag")]) == 0
        assert _results(str(tmp_path / "flag"))["config"]["backend"] == "cpu" and not calls


def test_resume_with_more_epochs_keeps_the_schedule_it_has_run_under(tiny_root, tmp_path):
    """--resume --epochs 8 after 1 epoch of a 4-epoch run: the lr decay (epoch 1 of 4) and the
    refreshes (after epochs 1, 2, 3) stay; 8 epochs from the start would put them at epoch 2 and
    after epochs 1, 3, 4, 5, 7, so the resumed epoch would train at the undecayed lr again."""
    run_dir = str(tmp_path / "run")
    assert main(["--data-root", tiny_root, *FAST, "--epochs", "4", "--stop-after", "1", "--output-dir", run_dir]) == 0
    ckpt = os.path.join(run_dir, "checkpoint.pt")
    assert main(["--resume", ckpt, "--epochs", "8", "--stop-after", "1", "--no-progress", "--quiet"]) == 0
    records = _epoch_records(run_dir)
    assert [r["epoch"] for r in records] == [1, 2]
    assert [r["lr"] for r in records] == [pytest.approx(1e-3), pytest.approx(2e-4)]
    assert [r["pseudo_refreshes"] for r in records] == [1, 2]
    # Each refresh is logged ("pseudo labels {...}") right above its epoch's line.
    with open(os.path.join(run_dir, "train.log")) as f:
        lines = [line for line in f if line.startswith(("epoch ", "pseudo labels "))]
    assert [json.loads(line[len("pseudo labels "):])["refresh"] for line in lines if line.startswith("pseudo")] == [1, 2], lines
    assert [line.split(" ", 1)[0] for line in lines] == ["pseudo", "epoch", "pseudo", "epoch"], lines
    config = torch.load(ckpt, weights_only=True)["config"]
    assert (config["epochs"], config["schedule_epochs"]) == (8, 4)
    # Resumed again, with yet another length: still the first run's schedule.
    assert main(["--resume", ckpt, "--epochs", "3", "--no-progress", "--quiet"]) == 0
    assert [r["pseudo_refreshes"] for r in _epoch_records(run_dir)] == [1, 2, 2]
    assert torch.load(ckpt, weights_only=True)["config"]["schedule_epochs"] == 4


def test_resume_refuses_fewer_epochs_than_it_has_trained(tiny_root, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["--data-root", tiny_root, *FAST, "--epochs", "3", "--stop-after", "2", "--output-dir", str(run_dir)]) == 0
    before = {name: (run_dir / name).read_bytes() for name in ("checkpoint.pt", "train.log")}
    code, err = _call(["--resume", str(run_dir / "checkpoint.pt"), "--epochs", "1", "--quiet", "--no-progress"], capsys)
    assert code == 2 and "--epochs 1: the resumed run has already trained 2 epochs" in err
    assert {name: (run_dir / name).read_bytes() for name in before} == before
    assert not (run_dir / "results.json").exists()


def test_run_resume_checks_the_settings_as_the_command_does(tiny_root, tmp_path):
    """engine.run(resume=...) took a Config of other settings than the checkpoint's (here MMSD's
    defaults for the flags not given) and continued the run with them; and it placed the lr decay
    and refreshes of a longer run by its new length."""
    run_dir = tmp_path / "run"
    assert main(["--data-root", tiny_root, *FAST, "--epochs", "3", "--stop-after", "2", "--output-dir", str(run_dir)]) == 0
    ckpt = str(run_dir / "checkpoint.pt")
    saved = engine.Config.from_dict(torch.load(ckpt, weights_only=True)["config"])
    before = _snapshot_files(run_dir)
    other = tmp_path / "other"
    for config, message in [
        (engine.Config(data_root=tiny_root, dataset="Synthetic", embed_dim=16, batch_size=4, lr=1e-3, epochs=3, device="cpu",
                       dropout=0.3, voting=False),
         "--dropout: the resumed run used 0.6; --no-voting: the resumed run used voting = True; a resumed run keeps its "
         "settings (only --epochs, --data-root, --device, --backend, --eval-every, --tiou, --threads change)"),
        (dataclasses.replace(saved, epochs=1), "--epochs 1: the resumed run has already trained 2 epochs"),
        (dataclasses.replace(saved, schedule_epochs=7), "schedule_epochs 7: the resumed run places its lr decay and refreshes in 3"),
    ]:
        with pytest.raises(engine.UsageError) as info:
            engine.run(config, resume=ckpt, output_dir=str(other), progress=False, quiet=True)
        assert str(info.value).startswith(message), info.value
        assert not other.exists() and _snapshot_files(run_dir) == before
    # The run's own settings, 6 epochs: its decay and refreshes stay where 3 epochs put them.
    engine.run(dataclasses.replace(saved, epochs=6), resume=ckpt, progress=False, quiet=True)
    records = _epoch_records(run_dir)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["pseudo_refreshes"] for r in records] == [1, 2, 2, 2, 2, 2]
    assert torch.load(ckpt, weights_only=True)["config"]["schedule_epochs"] == 3


def _snapshot_files(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def test_stop_after_past_the_last_epoch_ends_the_run(tiny_root, tmp_path):
    run_dir = tmp_path / "run"
    assert main(["--data-root", tiny_root, *FAST, "--epochs", "2", "--stop-after", "5", "--output-dir", str(run_dir)]) == 0
    assert [r["epoch"] for r in _epoch_records(run_dir)] == [1, 2]
    assert _results(run_dir)["config"]["epochs"] == 2


def test_resume_with_the_epochs_done_only_evaluates(tiny_root, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["--data-root", tiny_root, *FAST, "--epochs", "3", "--stop-after", "2", "--output-dir", str(run_dir)]) == 0
    ckpt = str(run_dir / "checkpoint.pt")
    code, err = _call(["--resume", ckpt, "--pseudo-threshold", "0.3", "--no-progress", "--quiet"], capsys)
    assert code == 2 and "--pseudo-threshold: the resumed run used" in err, err
    assert main(["--resume", ckpt, "--epochs", "2", "--no-progress", "--quiet"]) == 0
    assert [r["epoch"] for r in _epoch_records(run_dir)] == [1, 2]
    assert _results(run_dir)["config"]["epochs"] == 2


def test_each_epoch_shuffles_anew_and_a_run_gives_back_the_thread_count(tiny_root, tmp_path, monkeypatch):
    d = data_mod.load_wtalc(tiny_root, "Synthetic")
    config = engine.Config(embed_dim=16, batch_size=4, device="cpu")
    trainer = engine.Trainer(config, d, torch.device("cpu"), engine.Dist("cpu"), progress=False)
    seen = []
    monkeypatch.setattr(trainer, "train_steps", lambda steps: seen.append(steps) or {})
    for epoch in (0, 1, 0):
        trainer.train_epoch(epoch)
    assert seen[0] == seen[2] != seen[1]
    assert sorted(sum(seen[1], [])) == list(range(len(trainer.train_idx)))
    order = torch.randperm(len(trainer.train_idx), generator=torch.Generator().manual_seed(engine._derived_seed(1, 1, 0)))
    assert sum(seen[1], []) == order.tolist()

    # A weight turned NaN stops the run even where every loss is finite.
    with torch.no_grad():
        trainer.model.centres[0, 0, 0] = float("nan")
    with pytest.raises(engine.UsageError, match=r"diverged in epoch 1 \(weights hold NaN or inf"):
        trainer.check_finite(0, {"total": 1.0, "cls": 1.0})

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main(["--data-root", tiny_root, *FAST, "--epochs", "1", "--threads", "1", "--output-dir", str(tmp_path / "run")]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_train_resume_eval_only(tiny_root, tmp_path):
    """End to end; a run interrupted and resumed equals the uninterrupted run bitwise;
    eval-only on the checkpoint reproduces the results."""
    common = ["--data-root", tiny_root, *FAST, "--epochs", "4", "--seed", "7"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert main(common + ["--output-dir", a]) == 0
    result = _results(a)
    assert set(result["map"]) == {"0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7"}
    assert all(0 <= v <= 100 for v in result["map"].values()) and 0 <= result["cmap"] <= 100
    assert result["average_map"] == pytest.approx(np.mean(list(result["map"].values())))
    assert result["config"]["epochs"] == 4 and result["config"]["streams"] == ["rgb", "flow", "fused"]
    records = _epoch_records(a)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert [r["pseudo_refreshes"] for r in records] == [1, 2, 3, 3]
    assert "voting" not in records[0] and all("voting" in r and "distill" in r for r in records[1:])

    assert main(common + ["--output-dir", b, "--stop-after", "2"]) == 0
    assert not os.path.exists(os.path.join(b, "results.json"))
    assert torch.load(os.path.join(b, "checkpoint.pt"), weights_only=True)["epoch"] == 2
    assert main(["--resume", os.path.join(b, "checkpoint.pt"), "--no-progress", "--quiet"]) == 0
    state_a = torch.load(os.path.join(a, "checkpoint.pt"), weights_only=True)
    state_b = torch.load(os.path.join(b, "checkpoint.pt"), weights_only=True)
    assert state_a["refreshes_done"] == state_b["refreshes_done"] == 3
    for key, value in state_a["model"].items():
        assert torch.equal(value, state_b["model"][key]), key
    assert torch.equal(state_a["pseudo_labels"], state_b["pseudo_labels"])
    assert _results(b)["map"] == result["map"] and _results(b)["cmap"] == result["cmap"]

    c = str(tmp_path / "c")
    assert (
        main(
            [
                "--eval-only",
                "--checkpoint",
                os.path.join(a, "checkpoint.pt"),
                "--data-root",
                tiny_root,
                "--output-dir",
                c,
                "--no-progress",
                "--quiet",
            ]
        )
        == 0
    )
    assert _results(c)["map"] == result["map"] and _results(c)["cmap"] == result["cmap"]


def test_ablation_switches(tiny_root, tmp_path):
    for flag, streams in [("--single-stream", ["fused"]), ("--no-fused-stream", ["rgb", "flow"])]:
        out = str(tmp_path / flag.strip("-"))
        assert main(["--data-root", tiny_root, *FAST, "--epochs", "2", flag, "--output-dir", out]) == 0
        state = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
        assert state["config"]["streams"] == streams
        assert state["model"]["centres"].shape[0] == len(streams)
        records = _epoch_records(out)
        assert all(("distill" in r) == (flag == "--no-fused-stream") for r in records)
        # Voting from the epoch after the first refresh on, and only with several streams.
        refreshed_before = [0] + [r["pseudo_refreshes"] for r in records[:-1]]
        assert [("voting" in r) for r in records] == [flag == "--no-fused-stream" and n > 0 for n in refreshed_before]
        assert records[-1]["pseudo_refreshes"] == (1 if flag == "--no-fused-stream" else 0)
    out = str(tmp_path / "nd")
    assert main(["--data-root", tiny_root, *FAST, "--epochs", "3", "--no-distill", "--no-voting", "--output-dir", out]) == 0
    records = _epoch_records(out)
    assert len(records) == 3 and not any("distill" in r or "voting" in r for r in records)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seeds", "-1"], "--seeds: expected an integer >= 0, got -1"),
        (["--seeds", "2", "1", "2"], "--seeds: 2 is given twice"),
        (["--epochs", "0"], "--epochs: expected an integer >= 1"),
        (["--synthetic-seed", str(2**32)], "--synthetic-seed: expected an integer <= 4294967295"),
        (["--variants", "6"], "--variants: invalid choice"),
        (["--backend", "cuda"], "--backend: invalid choice"),
        (["--backend", "triton"], "--backend triton:"),
        (["--output", "/nonexistent-folder/x.md"], "--output /nonexistent-folder/x.md: cannot write in /nonexistent-folder"),
        (["--output", "/"], "--output /: is a directory"),
        (["--output", ""], "--output: expected a file path, got an empty one"),
    ],
)
def test_ablation_bad_flags_fail_before_any_run(argv, message, capsys, monkeypatch):
    from mmsd_ext.train import ablation

    if argv[:2] == ["--backend", "triton"] and os.environ.get("TRITON_INTERPRET") == "1":
        monkeypatch.setattr(ablation, "check_backend", _refuse_triton)
    monkeypatch.setattr(ablation, "run", _no_run)
    with pytest.raises(SystemExit) as info:
        ablation.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_ablation_runs_on_the_environments_backend_where_no_flag_gives_one(capsys, monkeypatch):
    from mmsd_ext.train import ablation

    monkeypatch.setattr(ablation, "run", _no_run)
    monkeypatch.setenv("MMSD_EXT_BACKEND", "cuda")
    with pytest.raises(SystemExit) as info:
        ablation.main(["--seeds", "1", "--variants", "0", "--epochs", "1"])
    assert info.value.code == 2
    assert "error: --backend (from MMSD_EXT_BACKEND) cuda: backend='cuda'" in capsys.readouterr().err
    monkeypatch.setenv("MMSD_EXT_BACKEND", "reference")
    calls = []
    monkeypatch.setattr(ablation, "run", _fake_runs(calls))
    ablation.main(["--seeds", "1", "--variants", "0", "--epochs", "1"])
    assert [c.backend for c in calls] == ["reference"]


def test_ablation_finds_a_json_output_that_is_a_directory_before_any_run(tmp_path, capsys, monkeypatch):
    """Found only when the first run's results were written, with --overwrite."""
    from mmsd_ext.train import ablation

    out = tmp_path / "out.md"
    (tmp_path / "out.md.json").mkdir()
    monkeypatch.setattr(ablation, "run", _no_run)
    with pytest.raises(SystemExit) as info:
        ablation.main(["--seeds", "1", "--variants", "0", "--epochs", "1", "--output", str(out), "--overwrite"])
    assert info.value.code == 2
    assert f"error: --output {out}: {out}.json is a directory, where the ablation writes its runs" in capsys.readouterr().err


def test_a_gpu_backend_on_the_cpu_suggests_device_cuda_where_there_is_such_a_flag():
    for device_flag in (True, False):
        with pytest.raises(engine.UsageError) as info:
            engine.check_backend("cuda", torch.device("cpu"), device_flag=device_flag)
        assert str(info.value).startswith("--backend cuda: backend='cuda'")
        assert str(info.value).endswith("; give --device cuda to run on a GPU") == device_flag, info.value


def _no_run(*args, **kwargs):
    raise AssertionError("a run started")


def _refuse_triton(backend, device, device_flag=True, flag="--backend"):
    # What check_backend says without the interpreter (the tests run the Triton kernels under it).
    raise engine.UsageError(f"--backend {backend}: Triton kernels run on CUDA devices")


def _fake_runs(calls, interrupt_at=None):
    """engine.run's stand-in: mAP 10 * seed at every tIoU, cmAP 50 + seed."""

    def fake(config, **kwargs):
        calls.append(config)
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        value = 10.0 * config.seed
        return {"map": {f"{t:.1f}": value for t in engine.TIOUS}, "average_map": value, "cmap": 50.0 + config.seed}

    return fake


def test_ablation_table_runs_file_and_overwrite(tmp_path, capsys, monkeypatch):
    from mmsd_ext.train import ablation

    out = tmp_path / "ablation.md"
    calls = []
    monkeypatch.setattr(ablation, "run", _fake_runs(calls))
    argv = ["--seeds", "1", "3", "--variants", "0", "2", "--epochs", "4", "--output", str(out)]
    assert ablation.main(argv) == 0
    assert [(c.seed, c.epochs, c.distill) for c in calls] == [(1, 4, True), (3, 4, True), (1, 4, False), (3, 4, False)]
    table = out.read_text()
    assert table.strip() == capsys.readouterr().out.strip()
    row = next(line for line in table.splitlines() if line.startswith("| no distillation"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:8] == ["20.0"] * 7 and cells[8] == "20.0 +- 10.0" and cells[9] == "52.0 +- 1.0"
    saved = json.loads((tmp_path / "ablation.md.json").read_text())
    assert [(r["variant"], r["seed"], r["average_map"]) for r in saved["runs"]][-1] == ("no distillation (--no-distill)", 3, 30.0)

    # An earlier table is not replaced without --overwrite, and the check comes before any run.
    before = (out.read_bytes(), (tmp_path / "ablation.md.json").read_bytes())
    monkeypatch.setattr(ablation, "run", _no_run)
    with pytest.raises(SystemExit):
        ablation.main(argv)
    assert f"{out} and {out}.json already exist; pass --overwrite to replace them" in capsys.readouterr().err
    assert (out.read_bytes(), (tmp_path / "ablation.md.json").read_bytes()) == before
    lone = tmp_path / "lone.md"
    lone.write_text("an earlier table")
    with pytest.raises(SystemExit):
        ablation.main(argv[:-1] + [str(lone)])
    assert f"--output {lone}: {lone} already exists; pass --overwrite to replace it\n" in capsys.readouterr().err

    # Interrupted in the third run: the two finished runs are kept in the .json.
    calls.clear()
    monkeypatch.setattr(ablation, "run", _fake_runs(calls, interrupt_at=3))
    assert ablation.main(argv + ["--overwrite"]) == 130
    assert "the finished runs are in" in capsys.readouterr().err
    assert [r["seed"] for r in json.loads((tmp_path / "ablation.md.json").read_text())["runs"]] == [1, 3]
    # The earlier table summed runs this .json no longer holds: it went with them.
    assert not out.exists()


def test_ablation_one_real_run(tmp_path, capsys):
    from mmsd_ext.train import ablation

    out = tmp_path / "a.md"
    assert ablation.main(["--seeds", "1", "--variants", "5", "--epochs", "1", "--output", str(out)]) == 0
    run = json.loads((tmp_path / "a.md.json").read_text())["runs"][0]
    assert run["variant"] == "single stream (--single-stream)" and 0 <= run["average_map"] <= 100
    assert "| single stream (--single-stream) |" in out.read_text()


def test_tiou_flag_parses_ranges_and_lists():
    assert _tious("0.1:0.7:0.1") == engine.TIOUS  # MMSD's, the default
    assert _tious("0.5:0.95:0.05") == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)  # STOP included
    assert _tious("0.7,0.3,0.5") == (0.3, 0.5, 0.7)
    assert _tious("1") == (1.0,) and _tious("0.3:0.3:0.1") == (0.3,)
    assert _tious("0.1:0.7:0.6000000001") == (0.1, 0.7)  # a last value within the slack is STOP, not past it
    assert _tious("1e-11,2e-11") == (1e-11, 2e-11)  # two thresholds, two keys


def test_tiou_thresholds_of_training_resume_and_eval_only(tiny_root, tmp_path):
    """--tiou sets the thresholds of results.json; the checkpoint keeps them for a resumed run
    and eval-only, which may give others. The mAP at a threshold does not depend on the others
    evaluated with it, and a checkpoint saved before --tiou existed evaluates at MMSD's."""
    run_dir = tmp_path / "run"
    argv = ["--data-root", tiny_root, *FAST, "--epochs", "2", "--seed", "7", "--tiou", "0.5:0.95:0.05", "--output-dir", str(run_dir)]
    assert main(argv + ["--stop-after", "1"]) == 0
    ckpt = str(run_dir / "checkpoint.pt")
    assert main(["--resume", ckpt, "--no-progress", "--quiet"]) == 0
    full = _results(run_dir)
    assert list(full["map"]) == ["0.5", "0.55", "0.6", "0.65", "0.7", "0.75", "0.8", "0.85", "0.9", "0.95"]
    assert full["average_map"] == pytest.approx(np.mean(list(full["map"].values())))
    assert full["config"]["tious"] == [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]
    assert any(v > 0 for v in full["map"].values())  # else the comparisons below would prove little

    def eval_only(out, *extra, checkpoint=ckpt):
        assert main(["--eval-only", "--checkpoint", checkpoint, "--output-dir", str(tmp_path / out), "--no-progress",
                     "--quiet", *extra]) == 0
        return _results(tmp_path / out)

    assert eval_only("same")["map"] == full["map"]  # the checkpoint's thresholds
    some = eval_only("some", "--tiou", "0.7,0.5")
    assert some["map"] == {"0.5": full["map"]["0.5"], "0.7": full["map"]["0.7"]}

    state = torch.load(ckpt, weights_only=True)
    del state["config"]["tious"]
    torch.save(state, tmp_path / "old.pt")
    old = eval_only("old", checkpoint=str(tmp_path / "old.pt"))
    assert list(old["map"]) == ["0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7"]
    assert old["map"]["0.5"] == full["map"]["0.5"] and old["map"]["0.7"] == full["map"]["0.7"]

    state["config"]["tious"] = [0.7, 0.5]  # unsorted, as only a hand-edited checkpoint can be
    torch.save(state, tmp_path / "edited.pt")
    assert list(eval_only("edited", checkpoint=str(tmp_path / "edited.pt"))["map"].items()) == list(some["map"].items())


def test_feature_type_names_the_features_file_and_the_rate_of_the_seconds(tiny_root, tmp_path, capsys):
    """--feature-type UNT reads <dataset>-UNT-JOINTFeatures.npy and converts ground truth seconds
    at 10/4 snippets per second: the same features with their seconds written at that rate give
    the I3D run's numbers; read at I3D's 25/16 they do not. The checkpoint keeps the type."""
    unt_root = tmp_path / "data_unt"
    synthetic.write(str(unt_root), seed=3, feature_type="UNT", **TINY)
    assert sorted(os.listdir(unt_root / "Synthetic"))[0] == "Ambiguous_test.txt"
    assert (unt_root / "Synthetic" / "Synthetic-UNT-JOINTFeatures.npy").is_file()
    assert not (unt_root / "Synthetic" / "Synthetic-I3D-JOINTFeatures.npy").exists()
    common = [*FAST, "--epochs", "2", "--seed", "7"]

    def train(out, root, *extra):
        assert main(["--data-root", str(root), *common, "--output-dir", str(tmp_path / out), *extra]) == 0
        return _results(tmp_path / out)

    i3d = train("i3d", tiny_root)
    unt = train("unt", unt_root, "--feature-type", "UNT")
    assert i3d["config"]["feature_type"] == "I3D" and unt["config"]["feature_type"] == "UNT"
    assert any(v > 0 for v in i3d["map"].values())
    assert unt["map"] == i3d["map"] and unt["cmap"] == i3d["cmap"]

    # The UNT seconds read as I3D ones: the same model, other ground truth positions.
    mixed_root = tmp_path / "data_mixed"
    shutil.copytree(unt_root, mixed_root)
    folder = mixed_root / "Synthetic"
    os.rename(folder / "Synthetic-UNT-JOINTFeatures.npy", folder / "Synthetic-I3D-JOINTFeatures.npy")
    mixed = train("mixed", mixed_root)
    assert mixed["cmap"] == i3d["cmap"] and mixed["map"] != i3d["map"]

    # The type is the checkpoint's: kept on resume, not changeable there or in eval-only.
    ckpt = str(tmp_path / "unt" / "checkpoint.pt")
    assert main(["--eval-only", "--checkpoint", ckpt, "--output-dir", str(tmp_path / "e"), "--no-progress", "--quiet"]) == 0
    assert _results(tmp_path / "e")["map"] == unt["map"]
    code, err = _call(["--resume", ckpt, "--epochs", "3", "--feature-type", "I3D"], capsys)
    assert code == 2 and "--feature-type: the resumed run used 'UNT'; a resumed run keeps its settings" in err
    code, err = _call(["--eval-only", "--checkpoint", ckpt, "--feature-type", "I3D", "--output-dir", str(tmp_path / "e2")], capsys)
    assert code == 2 and "--feature-type: --eval-only takes the model settings from the checkpoint" in err
    assert not (tmp_path / "e2").exists()

    # A checkpoint saved before --feature-type existed is an I3D one.
    state = torch.load(os.path.join(tmp_path / "i3d", "checkpoint.pt"), weights_only=True)
    del state["config"]["feature_type"]
    torch.save(state, tmp_path / "old.pt")
    assert main(["--eval-only", "--checkpoint", str(tmp_path / "old.pt"), "--output-dir", str(tmp_path / "e3"), "--no-progress",
                 "--quiet"]) == 0
    assert _results(tmp_path / "e3")["map"] == i3d["map"]


def test_features_of_another_type_are_named_in_the_error(tiny_root, tmp_path, capsys):
    unt_root = tmp_path / "data_unt"
    synthetic.write(str(unt_root), seed=3, feature_type="UNT", **TINY)
    for root, flags, found, hint in [
        (tiny_root, ["--feature-type", "UNT"], "Synthetic-I3D-JOINTFeatures.npy", "give --feature-type I3D"),
        (str(unt_root), [], "Synthetic-UNT-JOINTFeatures.npy", "give --feature-type UNT"),
    ]:
        out = tmp_path / "out"
        code, err = _call(["--data-root", root, *FAST, "--epochs", "1", *flags, "--output-dir", str(out)], capsys)
        assert code == 2 and "JOINTFeatures.npy: file not found; the folder has " + found in err and hint in err, err
        assert not out.exists()
    code, err = _call(["--feature-type", "UNT", "--epochs", "1", "--output-dir", str(tmp_path / "out")], capsys)
    assert code == 2 and "--feature-type UNT: the synthetic dataset's features stand for I3D ones" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(data_mod.DataError, match="--feature-type: expected one of I3D, UNT, got 'C3D'"):
        data_mod.load_wtalc(tiny_root, "Synthetic", "C3D")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "0"], "expected an integer >= 1"),
        (["--lr", "-1"], "expected a number > 0"),
        (["--eval-only"], "needs --checkpoint"),
        (["--checkpoint", "x.pt"], "is for --eval-only"),
        (["--single-stream", "--no-fused-stream"], "contradict"),
        (["--backend", "fast"], "invalid choice"),
        (["--no-such-flag"], "unrecognized arguments"),
        (["--feature-type", "C3D"], "argument --feature-type: invalid choice: 'C3D'"),
        (["--dataset", "Thumos14reduced"], "--dataset names a folder under --data-root"),
        (["--data-root", ".", "--dataset", ""], "argument --dataset: expected a folder name under --data-root, got an empty one"),
        # A path (a trailing slash from tab completion, or a folder elsewhere) named files that do not exist.
        (["--data-root", ".", "--dataset", "Thumos14reduced/"], "argument --dataset: expected a folder name under --data-root, "
         "which also names its files (NAME-I3D-JOINTFeatures.npy), got 'Thumos14reduced/'"),
        (["--data-root", ".", "--dataset", "/data/Thumos14reduced"], "got '/data/Thumos14reduced'"),
        (["--data-root", ".", "--dataset", ".."], "argument --dataset: expected a folder name under --data-root"),
        # (it said "--eval-only needs --checkpoint CKPT")
        (["--resume", "x.pt", "--eval-only"], "--resume and --eval-only exclude each other; to evaluate a checkpoint: --eval-only --checkpoint CKPT"),
        (["--dropout", "1"], "--dropout: expected a number in [0, 1), got 1"),  # the loss never changed
        (["--eval-only", "--checkpoint", "x.pt", "--stop-after", "1"], "--stop-after has no meaning with --eval-only"),
    ],
)
def test_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_bad_backend_in_the_environment_is_a_flag_error_of_the_command(tmp_path):
    # MMSD_EXT_BACKEND was checked at import: the command ended in a traceback before it could
    # parse its flags, even for --help or with --backend given.
    env = {k: v for k, v in os.environ.items() if k != "MMSD_EXT_QUIET"} | {"MMSD_EXT_BACKEND": "bogus"}
    command = [sys.executable, "-m", "mmsd_ext.train"]
    bad = subprocess.run(command + ["--output-dir", str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == (
        "mmsd-train: error: --backend bogus: backend: expected one of reference, cpu, cuda, triton or 'auto', got 'bogus' "
        "(--backend bogus came from MMSD_EXT_BACKEND; give --backend to run with another)"
    )
    assert not os.path.exists(tmp_path / "run")
    helped = subprocess.run(command + ["--help"], env=env, capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "--backend" in helped.stdout, helped.stderr


def test_a_value_that_does_not_parse_is_named_by_its_kind(capsys):
    """argparse names a flag's type function in "invalid <name> value": every numeric flag reads
    as int or float there, not as the name of the function that checks it."""
    from mmsd_ext.train.__main__ import build_parser

    numeric = [a for a in build_parser()._actions if callable(a.type) and a.dest not in ("tious", "dataset")]  # those read text
    assert len(numeric) >= 10
    for action in numeric:
        flag = action.option_strings[0]
        code, err = _call([flag, "abc"], capsys)
        assert code == 2 and re.search(rf"argument {flag}: invalid (int|float) value: 'abc'$", err.strip()), err
    code, err = _call(["--lr", "abc"], capsys)
    assert err.strip().endswith("argument --lr: invalid float value: 'abc'"), err


def test_bad_paths_lose_nothing(tiny_root, tmp_path, capsys):
    assert main(["--data-root", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "o1")]) == 2
    assert "missing is not a directory" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists()
    assert main(["--eval-only", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert main(["--resume", str(tmp_path / "junk.pt")]) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err
    assert main(["--data-root", tiny_root, *FAST, "--backend", "cuda", "--output-dir", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip()
    # The flag is named, not a use_backend block, and a GPU device is suggested.
    assert err.startswith("mmsd-train: error: --backend cuda: backend='cuda'") and "use_backend" not in err, err
    assert err.endswith("; give --device cuda to run on a GPU"), err

    # MMSD_EXT_BACKEND, the ops' backend for a process, stands for --backend where that is not
    # given, and the error says where it came from.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MMSD_EXT_BACKEND", "cuda")
        assert main(["--data-root", tiny_root, *FAST, "--output-dir", str(tmp_path / "o3")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("mmsd-train: error: --backend cuda: backend='cuda'"), err
        assert err.endswith("(--backend cuda came from MMSD_EXT_BACKEND; give --backend to run with another)"), err
        assert not (tmp_path / "o3").exists()

    # A checkpoint evaluated on data it was not trained for.
    other = tmp_path / "other"
    synthetic.write(str(other), seed=1, **dict(TINY, num_classes=3))
    first_ckpt = str(tmp_path / "c1")
    assert main(["--data-root", tiny_root, *FAST, "--epochs", "1", "--output-dir", first_ckpt]) == 0
    # (Not --quiet: eval-only needs --output-dir for that.)
    argv = ["--eval-only", "--checkpoint", os.path.join(first_ckpt, "checkpoint.pt"), "--data-root", str(other), "--no-progress"]
    assert main(argv) == 2
    assert f"{other}/Synthetic has 3 classes and 16-d features" in capsys.readouterr().err

    # An earlier run's files are never overwritten without --overwrite.
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text("precious")
    assert main(["--data-root", tiny_root, *FAST, "--epochs", "1", "--output-dir", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "results.json").read_text() == "precious"

    # A resumed run keeps its settings.
    first = str(tmp_path / "first")
    assert main(["--data-root", tiny_root, *FAST, "--epochs", "2", "--stop-after", "1", "--output-dir", first]) == 0
    with pytest.raises(SystemExit):
        main(["--resume", os.path.join(first, "checkpoint.pt"), "--lr", "0.5"])
    assert "a resumed run keeps its settings" in capsys.readouterr().err


# -- bad input loses nothing -----------------------------------------------------------------


def _call(argv, capsys):
    """main's exit status (argparse errors included) and its stderr."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def _snapshot(folder):
    return {name: (folder / name).read_bytes() for name in ("checkpoint.pt", "results.json", "train.log")}


def _strict_json_lines(folder):
    """Every JSON payload of train.log parses as strict JSON (no NaN or Infinity)."""

    def refuse(name):
        raise ValueError(f"train.log holds {name}")

    with open(folder / "train.log") as f:
        for line in f:
            for prefix in ("epoch ", "config "):
                if line.startswith(prefix):
                    json.loads(line[len(prefix) :], parse_constant=refuse)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--weight-decay", "nan"], "argument --weight-decay"),
        (["--weight-decay", "-1"], "argument --weight-decay"),
        (["--seed", "-1"], "argument --seed"),
        (["--seed", str(2**32)], "argument --seed"),
        (["--synthetic-seed", "-1"], "argument --synthetic-seed"),
        (["--threads", "1000000000000"], "argument --threads"),
        (["--embed-dim", "1000000"], "argument --embed-dim: expected an integer <= 8192"),
        (["--epochs", "1" + "0" * 400], "argument --epochs"),
        (["--lr", "1e300"], "argument --lr"),
        (["--lr", "inf"], "argument --lr"),
        (["--lr-decay", "inf"], "argument --lr-decay"),
        (["--eval-only", "--checkpoint", "x.pt", "--quiet"], "--eval-only --quiet without --output-dir"),
        (["--tiou", "0.5,0.5"], "argument --tiou: threshold 0.5 given twice"),  # results.json keys by threshold
        (["--tiou", "0.3,nan"], "argument --tiou: expected thresholds in (0, 1], got nan"),
        (["--tiou", "0.5,1.5"], "argument --tiou: expected thresholds in (0, 1], got 1.5"),
        (["--tiou", "0:0.7:0.1"], "argument --tiou: expected 0 < START <= STOP <= 1 and STEP > 0"),
        (["--tiou", "0.1:0.7:0"], "argument --tiou: expected 0 < START <= STOP <= 1 and STEP > 0"),
        (["--tiou", "0.0001:1:0.0001"], "argument --tiou: expected at most 100 thresholds"),
        (["--tiou", "0.1:0.7:1e-320"], "argument --tiou: expected at most 100 thresholds"),  # (stop-start)/step = inf
        (["--tiou", "0.1:0.7:inf"], "argument --tiou: expected 0 < START <= STOP <= 1 and STEP > 0"),
        (["--tiou", "0.1:0.7"], "argument --tiou: expected START:STOP:STEP or T1,T2,..."),
        (["--tiou", "0.3,"], "argument --tiou: expected START:STOP:STEP or T1,T2,..."),
    ],
)
def test_unusable_flag_values_are_refused(argv, message, tmp_path, capsys):
    """Values argparse used to pass on to a traceback; refused by argparse, before any data is
    read (the data root does not exist, so a run that got that far would fail differently)."""
    with pytest.raises(SystemExit) as info:
        main(["--data-root", str(tmp_path / "missing"), *argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_overwrite_replaces_only_on_success(tiny_root, tmp_path, capsys):
    """--overwrite deletes nothing up front: a run that fails on its data or flags leaves the
    earlier run's files as they were; one that succeeds replaces each of them."""
    common = ["--data-root", tiny_root, *FAST, "--epochs", "1"]
    run_dir = tmp_path / "run"
    assert main(common + ["--output-dir", str(run_dir)]) == 0
    before = _snapshot(run_dir)

    code, err = _call(common + ["--output-dir", str(run_dir), "--overwrite", "--weight-decay", "-1"], capsys)
    assert code == 2 and "--weight-decay" in err
    assert _snapshot(run_dir) == before

    root, folder = _copy_dataset(tiny_root, tmp_path)
    np.save(folder / "subset.npy", np.array([b"test"] * (TINY["num_train"] + TINY["num_test"])))
    code, err = _call(["--data-root", str(root), *FAST, "--epochs", "1", "--output-dir", str(run_dir), "--overwrite"], capsys)
    assert code == 2 and "subset.npy" in err
    assert _snapshot(run_dir) == before

    assert main(common + ["--output-dir", str(run_dir), "--overwrite", "--seed", "9"]) == 0
    after = _snapshot(run_dir)
    assert all(after[name] != before[name] for name in before)
    log = (run_dir / "train.log").read_text()
    assert log.count("\nconfig ") == 1 and '"seed": 9' in log  # the new run's log only
    assert _results(run_dir)["config"]["seed"] == 9


def test_overwrite_run_that_stops_early_leaves_no_stale_results(tiny_root, tmp_path):
    """The earlier run's results.json goes with its checkpoint: a new run that stops before the
    end leaves its own checkpoint and log and no results (before 2026-11-27 it left the earlier
    run's results.json next to the new checkpoint)."""
    run_dir = tmp_path / "run"
    assert main(["--data-root", tiny_root, *FAST, "--epochs", "2", "--output-dir", str(run_dir)]) == 0
    assert _results(run_dir)["epoch"] == 2
    argv = ["--data-root", tiny_root, *FAST, "--epochs", "2", "--seed", "5", "--output-dir", str(run_dir), "--overwrite"]
    assert main(argv + ["--stop-after", "1"]) == 0
    assert not (run_dir / "results.json").exists()
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert main(["--resume", str(run_dir / "checkpoint.pt"), "--no-progress", "--quiet"]) == 0
    assert _results(run_dir)["epoch"] == 2 and _results(run_dir)["config"]["seed"] == 5


def test_out_of_memory_is_an_error_naming_the_epoch(tiny_root, tmp_path, capsys, monkeypatch):
    """Running out of memory in training or evaluation (the CPU allocator's RuntimeError,
    CUDA's OutOfMemoryError) ends in an error that says where and what is kept, not a
    traceback; other RuntimeErrors still propagate."""
    run_dir = tmp_path / "run"
    argv = ["--data-root", tiny_root, *FAST, "--epochs", "3", "--output-dir", str(run_dir)]
    train_epoch = engine.Trainer.train_epoch

    def failing(self, epoch):
        if epoch == 1:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried")
        return train_epoch(self, epoch)

    monkeypatch.setattr(engine.Trainer, "train_epoch", failing)
    code, err = _call(argv, capsys)
    assert code == 2, err
    assert "out of memory in epoch 2 ([enforce fail" in err
    assert f"{run_dir / 'checkpoint.pt'} (epoch 1) is kept; try a smaller --batch-size" in err
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert "stopped: out of memory in epoch 2" in (run_dir / "train.log").read_text()

    def full(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(engine.Trainer, "train_epoch", train_epoch)
    monkeypatch.setattr(engine, "predict", full)
    code, err = _call(["--resume", str(run_dir / "checkpoint.pt"), "--no-progress", "--quiet"], capsys)
    assert code == 2, err
    assert "out of memory in the evaluation after epoch 3 (CUDA out of memory. Tried to allocate 2.00 GiB)" in err
    assert "free memory on the device" in err

    def broken(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(engine, "predict", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(["--eval-only", "--checkpoint", str(run_dir / "checkpoint.pt"), "--no-progress", "--quiet", "--output-dir", str(tmp_path / "e")])


def test_eval_only_writes_only_results(tiny_root, tmp_path, capsys):
    """Eval-only into the checkpoint's own folder (with --overwrite) replaces results.json and
    nothing else; without results.json there, it needs no --overwrite."""
    run_dir = tmp_path / "run"
    assert main(["--data-root", tiny_root, *FAST, "--epochs", "1", "--output-dir", str(run_dir)]) == 0
    before = _snapshot(run_dir)
    ckpt = str(run_dir / "checkpoint.pt")
    assert main(["--eval-only", "--checkpoint", ckpt, "--output-dir", str(run_dir), "--overwrite", "--quiet", "--no-progress"]) == 0
    after = _snapshot(run_dir)
    assert after["checkpoint.pt"] == before["checkpoint.pt"] and after["train.log"] == before["train.log"]
    assert _results(run_dir)["map"] == json.loads(before["results.json"])["map"]

    (run_dir / "results.json").unlink()
    assert main(["--eval-only", "--checkpoint", ckpt, "--output-dir", str(run_dir), "--quiet", "--no-progress"]) == 0
    assert _snapshot(run_dir)["checkpoint.pt"] == before["checkpoint.pt"]
    # An earlier evaluation's results.json, alone in its folder, is not replaced without --overwrite.
    evals = tmp_path / "evals"
    argv = ["--eval-only", "--checkpoint", ckpt, "--output-dir", str(evals), "--quiet", "--no-progress"]
    assert main(argv) == 0
    code, err = _call(argv, capsys)
    assert code == 2 and err.rstrip().endswith("already holds results.json; pass --overwrite to replace it, or choose another folder")


def test_eval_only_into_another_runs_folder_is_refused(tiny_root, tmp_path, capsys):
    """Its results.json would sit beside another run's checkpoint and log (and a resume of that
    run would remove it as stale): refused, with --overwrite too, before anything is written."""
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["--data-root", tiny_root, *FAST, "--epochs", "1", "--output-dir", str(first)]) == 0
    assert main(["--data-root", tiny_root, *FAST, "--epochs", "2", "--stop-after", "1", "--output-dir", str(second)]) == 0
    before = {name: (second / name).read_bytes() for name in ("checkpoint.pt", "train.log")}
    ckpt = str(first / "checkpoint.pt")
    for extra in ([], ["--overwrite"]):
        code, err = _call(["--eval-only", "--checkpoint", ckpt, "--output-dir", str(second), "--quiet", "--no-progress", *extra],
                          capsys)
        assert code == 2 and "holds checkpoint.pt and train.log of another run" in err, err
        assert sorted(os.listdir(second)) == ["checkpoint.pt", "train.log"]
    (second / "checkpoint.pt").unlink()  # a run that stopped before its first checkpoint: its log alone
    code, err = _call(["--eval-only", "--checkpoint", ckpt, "--output-dir", str(second), "--quiet", "--no-progress"], capsys)
    assert code == 2 and "holds train.log of another run" in err, err
    assert (second / "train.log").read_bytes() == before["train.log"]
    # Its own folder, reached through a link to it, is its own.
    os.symlink(first, tmp_path / "link")
    (first / "results.json").unlink()
    assert main(["--eval-only", "--checkpoint", ckpt, "--output-dir", str(tmp_path / "link"), "--quiet", "--no-progress"]) == 0
    assert (first / "results.json").is_file()


def _keep_videos(folder, keep):
    """Keep only the videos ``keep`` in every per-video file of ``folder``."""
    for name in ("labels_all", "segments", "labels", "videoname", "subset", "duration", "Synthetic-I3D-JOINTFeatures"):
        values = np.load(folder / f"{name}.npy", allow_pickle=True)
        kept = np.empty(len(keep), dtype=object) if values.dtype == object else values[keep]
        if values.dtype == object:
            kept[:] = [values[i] for i in keep]
        np.save(folder / f"{name}.npy", kept, allow_pickle=True)


def test_eval_only_of_a_folder_holding_the_test_split_alone(tiny_root, tmp_path):
    """Evaluation needs no training split: it failed with "no video in subset 'validation'"."""
    run_dir = tmp_path / "run"
    assert main(["--data-root", tiny_root, *FAST, "--epochs", "1", "--output-dir", str(run_dir)]) == 0
    root, folder = _copy_dataset(tiny_root, tmp_path)
    subsets = np.load(folder / "subset.npy", allow_pickle=True)
    keep = [i for i, s in enumerate(subsets) if s == b"test"]
    _keep_videos(folder, keep)
    test_only = data_mod.load_wtalc(str(root), "Synthetic")
    assert test_only.describe().startswith(f"Synthetic: {len(keep)} videos (0 train, {len(keep)} test), 4 classes")
    out = tmp_path / "eval"
    argv = ["--eval-only", "--checkpoint", str(run_dir / "checkpoint.pt"), "--data-root", str(root), "--output-dir", str(out)]
    assert main(argv + ["--no-progress", "--quiet"]) == 0
    assert _results(out)["map"] == _results(run_dir)["map"] and _results(out)["cmap"] == _results(run_dir)["cmap"]
    assert _results(out)["num_test_videos"] == len(keep)


def test_eval_only_of_an_activitynet_folder_holding_its_test_split_alone(tiny_root, tmp_path, capsys):
    """ActivityNet's test split is "validation", which alone could be THUMOS14's training split:
    the folder could not tell ("cannot tell the splits apart"). The checkpoint says which split
    its run tested on."""
    root, folder = _copy_dataset(tiny_root, tmp_path)
    subsets = np.load(folder / "subset.npy", allow_pickle=True)
    np.save(folder / "subset.npy", np.asarray([{b"validation": b"training", b"test": b"validation"}[s] for s in subsets]))
    run_dir = tmp_path / "run"
    assert main(["--data-root", str(root), *FAST, "--epochs", "1", "--output-dir", str(run_dir)]) == 0
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["splits"] == ["training", "validation"]
    test_root = tmp_path / "test-only"
    shutil.copytree(root, test_root)
    _keep_videos(test_root / "Synthetic", [i for i, s in enumerate(subsets) if s == b"test"])
    out = tmp_path / "eval"
    argv = ["--eval-only", "--checkpoint", str(run_dir / "checkpoint.pt"), "--data-root", str(test_root), "--output-dir", str(out)]
    assert main(argv + ["--no-progress", "--quiet"]) == 0, capsys.readouterr().err
    assert _results(out)["map"] == _results(run_dir)["map"] and _results(out)["cmap"] == _results(run_dir)["cmap"]
    # Without the checkpoint's word (one written before 2026-11-29), the folder alone still cannot tell.
    with pytest.raises(data_mod.DataError, match="cannot tell the splits apart"):
        data_mod.load_wtalc(str(test_root), "Synthetic").split_names()


def test_eval_only_takes_threads_and_resume_says_it_does(tiny_root, tmp_path, capsys):
    """--threads is how this machine runs, not a model setting: --eval-only refused it."""
    run_dir = tmp_path / "run"
    assert main(["--data-root", tiny_root, *FAST, "--epochs", "1", "--output-dir", str(run_dir)]) == 0
    ckpt = str(run_dir / "checkpoint.pt")
    out = tmp_path / "eval"
    code, err = _call(["--eval-only", "--checkpoint", ckpt, "--threads", "1", "--output-dir", str(out), "--no-progress", "--quiet"],
                      capsys)
    assert code == 0, err
    assert _results(out)["config"]["threads"] == 1 and _results(out)["map"] == _results(run_dir)["map"]
    code, err = _call(["--resume", ckpt, "--lr", "0.1", "--no-progress", "--quiet"], capsys)
    assert code == 2 and err.rstrip().endswith(
        "--lr: the resumed run used 0.001; a resumed run keeps its settings "
        "(only --epochs, --data-root, --device, --backend, --eval-every, --tiou, --threads change)"
    ), err


def test_data_flags_the_run_would_ignore_are_refused(tiny_root, tmp_path, capsys):
    """--dataset for the synthetic dataset (an eval-only of a synthetic run recorded it in
    results.json and evaluated the synthetic set) and --synthetic-seed with --data-root."""
    run_dir = tmp_path / "run"
    assert main(["--data-root", tiny_root, *FAST, "--epochs", "1", "--output-dir", str(run_dir)]) == 0
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    state["config"]["data_root"] = None  # as a run on the synthetic dataset saves it
    synthetic_ckpt = tmp_path / "synthetic.pt"
    torch.save(state, synthetic_ckpt)
    out = tmp_path / "out"
    for argv, message in [
        (["--eval-only", "--checkpoint", str(synthetic_ckpt), "--dataset", "NoSuchDataset", "--output-dir", str(out)],
         "error: --dataset names a folder under --data-root, and the checkpoint's run used the synthetic dataset "
         "(no --data-root); give --data-root too"),
        (["--data-root", tiny_root, *FAST, "--synthetic-seed", "7", "--output-dir", str(out)],
         f"error: --synthetic-seed seeds the synthetic dataset, but the data is read from {tiny_root}; drop --synthetic-seed"),
        (["--eval-only", "--checkpoint", str(run_dir / "checkpoint.pt"), "--synthetic-seed", "7", "--output-dir", str(out)],
         f"error: --synthetic-seed seeds the synthetic dataset, but the checkpoint's run read its data from {tiny_root}"),
    ]:
        code, err = _call(argv + ["--no-progress", "--quiet"], capsys)
        assert code == 2 and message in err, err
        assert not out.exists()


def test_a_checkpoints_feature_type_is_not_advised_away(tiny_root, tmp_path, capsys):
    """A run on UNT features, resumed or evaluated on a folder with I3D features only: the error
    advised --feature-type I3D, which --resume and --eval-only then refused."""
    unt_root = tmp_path / "data_unt"
    synthetic.write(str(unt_root), seed=3, feature_type="UNT", **TINY)
    run_dir = tmp_path / "run"
    assert main(["--data-root", str(unt_root), *FAST, "--feature-type", "UNT", "--epochs", "2", "--stop-after", "1",
                 "--output-dir", str(run_dir)]) == 0
    ckpt = str(run_dir / "checkpoint.pt")
    wanted = (
        f"{tiny_root}/Synthetic/Synthetic-UNT-JOINTFeatures.npy: file not found; the folder has "
        "Synthetic-I3D-JOINTFeatures.npy, but the checkpoint's model was trained on UNT features (--feature-type UNT, "
        "which --resume and --eval-only keep); give --data-root of a folder with UNT features"
    )
    for argv in (["--resume", ckpt], ["--eval-only", "--checkpoint", ckpt, "--output-dir", str(tmp_path / "e")]):
        code, err = _call(argv + ["--data-root", tiny_root, "--no-progress", "--quiet"], capsys)
        assert code == 2 and err == f"mmsd-train: error: {wanted}\n", err
    assert not (tmp_path / "e").exists()


def test_a_checkpoint_device_this_machine_lacks_is_named_as_the_checkpoints(tiny_root, tmp_path, capsys):
    """A run trained with --device cuda:N (or a GPU backend) resumed or evaluated where that
    cannot run: the error says the setting came from the checkpoint and which flag overrides it;
    with the flag, the run goes on."""
    run_dir = tmp_path / "run"
    assert main(["--data-root", tiny_root, *FAST, "--epochs", "2", "--stop-after", "1", "--output-dir", str(run_dir)]) == 0
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    for key, value in (("device", f"cuda:{torch.cuda.device_count() + 3}"), ("backend", "cuda")):
        forged = dict(state, config=dict(state["config"], **{key: value}))
        ckpt = tmp_path / f"{key}.pt"
        torch.save(forged, ckpt)
        capsys.readouterr()
        for argv in (["--resume", str(ckpt)], ["--eval-only", "--checkpoint", str(ckpt)]):
            assert main([*argv, "--no-progress", "--output-dir", str(tmp_path / "out")]) == 2
            err = capsys.readouterr().err
            assert f"--{key} {value}" in err and f"is the checkpoint's setting; give --{key}" in err, err
    fixed = ["--device", "cpu", "--backend", "auto", "--no-progress", "--quiet"]
    assert main(["--resume", str(tmp_path / "device.pt"), *fixed, "--output-dir", str(tmp_path / "o1")]) == 0
    assert main(["--eval-only", "--checkpoint", str(tmp_path / "backend.pt"), *fixed, "--output-dir", str(tmp_path / "o2")]) == 0


def test_a_checkpoint_data_root_that_moved_is_named_as_the_checkpoints(tiny_root, tmp_path, capsys):
    # The error named --data-root, which the command line did not hold.
    data = tmp_path / "data"
    shutil.copytree(tiny_root, data)
    run_dir = tmp_path / "run"
    assert main(["--data-root", str(data), *FAST, "--epochs", "2", "--stop-after", "1", "--output-dir", str(run_dir)]) == 0
    data.rename(tmp_path / "moved")
    capsys.readouterr()
    wanted = (
        f"mmsd-train: error: --data-root: {data} is not a directory (--data-root {data} is the checkpoint's setting; "
        "give --data-root to run with another here)\n"
    )
    ckpt = str(run_dir / "checkpoint.pt")
    for argv in (["--resume", ckpt], ["--eval-only", "--checkpoint", ckpt, "--output-dir", str(tmp_path / "e")]):
        assert main([*argv, "--no-progress", "--quiet"]) == 2
        assert capsys.readouterr().err == wanted
    assert main(["--resume", ckpt, "--data-root", str(tmp_path / "moved"), "--no-progress", "--quiet"]) == 0


def test_torchrun_with_more_processes_than_gpus_is_a_usage_error(tiny_root, tmp_path, monkeypatch, capsys):
    """A process of torchrun whose local rank has no GPU: a message naming the cause, before
    torch.cuda.set_device or NCCL fail with their own (a traceback)."""
    monkeypatch.setenv("RANK", "64")
    monkeypatch.setenv("WORLD_SIZE", "65")
    monkeypatch.setenv("LOCAL_RANK", "64")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(engine.UsageError, match="no CUDA device is visible to torch; give --device cpu"):
        engine.Dist("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(engine.UsageError, match=r"process 64 of this node has no GPU of its own \(2 CUDA device"):
        engine.Dist("cuda")
    assert main(["--data-root", tiny_root, *FAST, "--device", "cuda", "--output-dir", str(tmp_path / "run")]) == 2
    assert "has no GPU of its own" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    # --device cuda:N other than a process's own GPU: NCCL's communicator is bound to that one.
    rank1 = types.SimpleNamespace(active=True, nccl=True, local_rank=1)
    with pytest.raises(engine.UsageError, match=r"--device cuda:0: under torchrun each process uses the GPU of its local rank \(here cuda:1\)"):
        engine._resolve_device("cuda:0", rank1)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"WORLD_SIZE": "1", "RANK": "0"}, "environment variable MASTER_ADDR is not set; a distributed run"),
        ({"WORLD_SIZE": "1", "RANK": "0", "MASTER_ADDR": ""}, "environment variable MASTER_ADDR is not set; a distributed run"),
        ({"WORLD_SIZE": "1", "RANK": "0", "MASTER_ADDR": "127.0.0.1"}, "environment variable MASTER_PORT is not set"),
        ({"WORLD_SIZE": "1", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "x"},
         "environment variable MASTER_PORT: expected an integer in [1, 65535], got 'x'"),
        ({"WORLD_SIZE": "abc", "RANK": "0"}, "environment variable WORLD_SIZE: expected an integer >= 1, got 'abc'"),
        ({"WORLD_SIZE": "0", "RANK": "0"}, "environment variable WORLD_SIZE: expected an integer >= 1, got '0'"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, "environment variable RANK: expected an integer in [0, 1], got '2'"),
        ({"WORLD_SIZE": "2", "RANK": "one"}, "environment variable RANK: expected an integer in [0, 1], got 'one'"),
        ({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "x"}, "environment variable LOCAL_RANK: expected an integer >= 0, got 'x'"),
        # Half of torchrun's pair: rank 0 alone trained on half the videos of each step (WORLD_SIZE
        # 2), or a process of rank 1 trained and wrote nothing (RANK 1).
        ({"WORLD_SIZE": "2"}, "environment variable RANK is not set, but WORLD_SIZE is ('2'): a distributed run needs both"),
        ({"RANK": "1"}, "environment variable WORLD_SIZE is not set, but RANK is ('1')"),
    ],
)
def test_a_missing_or_malformed_torchrun_variable_is_named(tiny_root, tmp_path, monkeypatch, capsys, env, message):
    """Before init_process_group: it raised a traceback about env:// rendezvous, and int() one
    about a literal, naming no flag or variable of this program."""
    for name in engine.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "run"
    code, err = _call(["--data-root", tiny_root, *FAST, "--epochs", "1", "--output-dir", str(out)], capsys)
    assert code == 2 and err.startswith(f"mmsd-train: error: {message}") and len(err.splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.parametrize(
    "flag, env, progress",
    [([], None, True), (["--no-progress"], None, False), ([], "1", False), ([], "", True)],
)
def test_progress_bars_follow_the_flag_and_mmsd_ext_no_progress(monkeypatch, flag, env, progress):
    import mmsd_ext.train.__main__ as cli

    asked = {}

    def fake_run(config, **kwargs):
        asked.update(kwargs)
        return {}

    monkeypatch.setattr(cli, "run", fake_run)
    monkeypatch.delenv("MMSD_EXT_NO_PROGRESS", raising=False)
    if env is not None:
        monkeypatch.setenv("MMSD_EXT_NO_PROGRESS", env)
    assert cli.main(["--synthetic-seed", "0", "--epochs", "1", *flag]) == 0
    assert asked["progress"] is progress


def test_an_in_process_run_restores_the_callers_determinism(tiny_root, tmp_path):
    # The run asks for deterministic algorithms on the CPU; a caller's warn_only mode comes back.
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        assert main(["--data-root", tiny_root, *FAST, "--epochs", "1", "--output-dir", str(tmp_path / "run")]) == 0
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_resume_overwrite_same_folder_keeps_checkpoint_and_log(tiny_root, tmp_path, capsys):
    """--resume CKPT --output-dir <its folder> --overwrite: the checkpoint survives an error
    (here: the data changed since), and the resumed run appends to its train.log."""
    root, folder = _copy_dataset(tiny_root, tmp_path)
    run_dir = tmp_path / "run"
    ckpt = str(run_dir / "checkpoint.pt")
    argv = ["--data-root", str(root), *FAST, "--epochs", "2", "--stop-after", "1", "--output-dir", str(run_dir)]
    assert main(argv) == 0
    saved = {name: (run_dir / name).read_bytes() for name in ("checkpoint.pt", "train.log")}

    synthetic.write(str(root), seed=5, **dict(TINY, num_train=15))  # the data changed in place
    code, err = _call(["--resume", ckpt, "--output-dir", str(run_dir), "--overwrite", "--quiet", "--no-progress"], capsys)
    assert code == 2 and "the data changed" in err
    assert {name: (run_dir / name).read_bytes() for name in saved} == saved

    synthetic.write(str(root), seed=3, **TINY)  # back as it was
    assert main(["--resume", ckpt, "--output-dir", str(run_dir), "--overwrite", "--quiet", "--no-progress"]) == 0
    assert [r["epoch"] for r in _epoch_records(run_dir)] == [1, 2]
    assert (run_dir / "train.log").read_bytes().startswith(saved["train.log"])


def test_a_checkpoint_for_another_model_size_says_what_it_was_trained_for(tiny_root, tmp_path, capsys):
    """Resumed or evaluated on data of another class count or feature size: what the checkpoint
    was trained for against what the data has, where torch's size-mismatch text named only
    tensor shapes."""
    run_dir = tmp_path / "run"
    assert main(["--data-root", tiny_root, *FAST, "--epochs", "2", "--stop-after", "1", "--output-dir", str(run_dir)]) == 0
    saved = {name: (run_dir / name).read_bytes() for name in ("checkpoint.pt", "train.log")}
    ckpt = str(run_dir / "checkpoint.pt")
    trained = f"the checkpoint's model was trained for 4 classes and 16-d features (on {os.path.join(tiny_root, 'Synthetic')})"
    for name, size, has in [("classes", dict(num_classes=3), "3 classes and 16-d features"),
                            ("dim", dict(modality_dim=5), "4 classes and 10-d features")]:
        other = tmp_path / name
        synthetic.write(str(other), seed=1, **dict(TINY, **size))
        for argv in (["--resume", ckpt], ["--eval-only", "--checkpoint", ckpt, "--output-dir", str(tmp_path / "e")]):
            code, err = _call(argv + ["--data-root", str(other), "--no-progress", "--quiet"], capsys)
            assert code == 2 and err == f"mmsd-train: error: {trained}; {other}/Synthetic has {has}\n", err
    assert {name: (run_dir / name).read_bytes() for name in saved} == saved and not (tmp_path / "e").exists()
    # The synthetic dataset's checkpoint (no data root) on files of another size.
    assert main([*FAST[2:], "--embed-dim", "16", "--epochs", "1", "--output-dir", str(tmp_path / "syn")]) == 0
    code, err = _call(["--eval-only", "--checkpoint", str(tmp_path / "syn" / "checkpoint.pt"), "--data-root", tiny_root,
                       "--dataset", "Synthetic", "--no-progress"], capsys)
    assert code == 2 and "(on the synthetic dataset); " in err and "has 4 classes and 16-d features" in err, err


def test_a_checkpoint_is_loaded_only_for_its_own_videos_and_classes(tiny_root, tmp_path, capsys):
    """Same shapes, other names: a resume would have reused another video's pseudo labels and
    an evaluation scored the classes under other names, both without a word (before 2026-11-27)."""
    root, folder = _copy_dataset(tiny_root, tmp_path)
    run_dir = tmp_path / "run"
    ckpt = str(run_dir / "checkpoint.pt")
    assert main(["--data-root", str(root), *FAST, "--epochs", "2", "--stop-after", "1", "--output-dir", str(run_dir)]) == 0
    saved = (run_dir / "checkpoint.pt").read_bytes()

    names = np.load(folder / "videoname.npy", allow_pickle=True)
    renamed = names.copy()
    renamed[1] = b"another_video"
    np.save(folder / "videoname.npy", renamed)
    code, err = _call(["--resume", ckpt, "--quiet", "--no-progress"], capsys)
    assert code == 2 and "other training videos" in err and "from position 1 on" in err
    assert (run_dir / "checkpoint.pt").read_bytes() == saved
    np.save(folder / "videoname.npy", names)

    classes = np.load(folder / "classlist.npy", allow_pickle=True)
    old_name = _text(classes[2])
    np.save(folder / "classlist.npy", np.array([("another_class" if _text(c) == old_name else _text(c)) for c in classes]))
    # Class names are also in labels.npy / labels_all.npy: rename them there too, so the
    # data stays consistent and only the checkpoint disagrees.
    for file in ("labels.npy", "labels_all.npy"):
        values = np.load(folder / file, allow_pickle=True)
        for i, row in enumerate(values):
            values[i] = [("another_class" if _text(x) == old_name else _text(x)) for x in row]
        np.save(folder / file, values)
    code, err = _call(["--eval-only", "--checkpoint", ckpt, "--data-root", str(root), "--dataset", "Synthetic", "--no-progress"], capsys)
    assert code == 2 and "other classes" in err and "class 2" in err


@pytest.mark.parametrize("damage", ["no_segments", "no_labels", "no_train", "no_train_labels"])
def test_unusable_splits_fail_before_the_output_folder(tiny_root, tmp_path, capsys, damage):
    """A test split without ground truth or labels, or no training video, fails before the
    output folder is made (and before an earlier run's folder is touched)."""
    root, folder = _copy_dataset(tiny_root, tmp_path)
    test = range(TINY["num_train"], TINY["num_train"] + TINY["num_test"])
    if damage == "no_segments":
        segments, labels = np.load(folder / "segments.npy", allow_pickle=True), np.load(folder / "labels.npy", allow_pickle=True)
        for i in test:
            segments[i], labels[i] = [], []
        np.save(folder / "segments.npy", segments, allow_pickle=True)
        np.save(folder / "labels.npy", labels, allow_pickle=True)
        file = "segments.npy"
    elif damage == "no_labels":
        labels_all = np.load(folder / "labels_all.npy", allow_pickle=True)
        for i in test:
            labels_all[i] = []
        np.save(folder / "labels_all.npy", labels_all, allow_pickle=True)
        file = "labels_all.npy"
    elif damage == "no_train_labels":  # it trained on nothing, without a word
        labels_all = np.load(folder / "labels_all.npy", allow_pickle=True)
        for i in range(TINY["num_train"]):
            labels_all[i] = []
        np.save(folder / "labels_all.npy", labels_all, allow_pickle=True)
        file = "labels_all.npy: no video of the 'validation' split has a label"
    else:
        np.save(folder / "subset.npy", np.array([b"test"] * (TINY["num_train"] + TINY["num_test"])))
        file = "subset.npy"
    out = tmp_path / "new"
    code, err = _call(["--data-root", str(root), *FAST, "--epochs", "1", "--output-dir", str(out)], capsys)
    assert code == 2 and file in err, err
    assert not out.exists()


def test_diverged_training_stops_before_saving(tiny_root, tmp_path, capsys):
    """A loss that turns NaN (here: finite but huge features) stops the run with a message
    naming the epoch and --lr; the earlier run's checkpoint, results and train.log stay (this
    run's log lines wait for its first checkpoint), train.log stays strict JSON lines."""
    run_dir = tmp_path / "run"
    assert main(["--data-root", tiny_root, *FAST, "--epochs", "1", "--output-dir", str(run_dir)]) == 0
    before = _snapshot(run_dir)
    root, folder = _copy_dataset(tiny_root, tmp_path)
    feats = np.load(folder / "Synthetic-I3D-JOINTFeatures.npy", allow_pickle=True)
    feats[2] = np.full_like(feats[2], 3e38)
    np.save(folder / "Synthetic-I3D-JOINTFeatures.npy", feats, allow_pickle=True)
    argv = ["--data-root", str(root), *FAST, "--epochs", "2", "--output-dir", str(run_dir), "--overwrite"]
    code, err = _call(argv, capsys)
    assert code == 2 and "diverged in epoch 1" in err and "--lr" in err
    after = _snapshot(run_dir)
    assert after["checkpoint.pt"] == before["checkpoint.pt"] and after["results.json"] == before["results.json"]
    _strict_json_lines(run_dir)
    assert after["train.log"] == before["train.log"]


def test_features_whose_embeddings_overflow_stop_training_and_evaluation(tiny_root, tmp_path, capsys):
    """Features of 1e30 (finite, within float32) give embeddings whose squared norms overflow:
    every cosine 0, every score alike. The run trained on in silence and reported an mAP of 0;
    training and evaluation now stop naming the epoch and the features' magnitude."""
    root, folder = _copy_dataset(tiny_root, tmp_path)
    path = folder / "Synthetic-I3D-JOINTFeatures.npy"
    feats = np.load(path, allow_pickle=True)
    for i in range(len(feats)):
        feats[i] = feats[i] * np.float32(1e30)
    np.save(path, feats, allow_pickle=True)
    run_dir = tmp_path / "run"
    code, err = _call(["--data-root", str(root), *FAST, "--epochs", "1", "--output-dir", str(run_dir)], capsys)
    assert code == 2, err
    assert "embeddings overflowed float32 in epoch 1 (features reach" in err and "e+30 in magnitude, in video_" in err
    assert "no checkpoint was written" in err and "scale the features down" in err
    assert not (run_dir / "checkpoint.pt").exists() and not (run_dir / "results.json").exists()
    # A model trained on ordinary features, evaluated on the scaled ones.
    good = tmp_path / "good"
    assert main(["--data-root", tiny_root, *FAST, "--epochs", "1", "--output-dir", str(good)]) == 0
    argv = ["--eval-only", "--checkpoint", str(good / "checkpoint.pt"), "--data-root", str(root),
            "--output-dir", str(tmp_path / "eval"), "--quiet", "--no-progress"]
    code, err = _call(argv, capsys)
    assert code == 2 and "embeddings overflowed float32 on" in err and "scale the features down" in err, err
    assert not (tmp_path / "eval" / "results.json").exists()


def test_overwrite_replaces_the_log_with_the_first_checkpoint(tiny_root, tmp_path, capsys, monkeypatch):
    """--overwrite over an earlier run, interrupted: in its first epoch, the earlier run's
    three files stay as they were; in its second, checkpoint and log are this run's (epoch 1)
    and the earlier results.json is gone."""
    run_dir = tmp_path / "run"
    assert main(["--data-root", tiny_root, *FAST, "--epochs", "1", "--seed", "3", "--output-dir", str(run_dir)]) == 0
    before = _snapshot(run_dir)
    train_epoch = engine.Trainer.train_epoch
    for stop_in, kept in [(0, True), (1, False)]:

        def interrupted(self, epoch, stop_in=stop_in):
            if epoch == stop_in:
                raise KeyboardInterrupt
            return train_epoch(self, epoch)

        monkeypatch.setattr(engine.Trainer, "train_epoch", interrupted)
        argv = ["--data-root", tiny_root, *FAST, "--epochs", "3", "--seed", "4", "--output-dir", str(run_dir), "--overwrite"]
        assert _call(argv, capsys)[0] == 130
        if kept:
            assert _snapshot(run_dir) == before
        else:
            assert not (run_dir / "results.json").exists()
            assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"] == 1
            log = (run_dir / "train.log").read_text()
            assert log != before["train.log"].decode() and '"seed": 4' in log
            assert [r["epoch"] for r in _epoch_records(run_dir)] == [1]
            assert log.endswith("\nstopped: interrupted in epoch 2\n")


@pytest.mark.parametrize("name", ["train.log", "results.json", "checkpoint.pt"])
def test_an_output_file_that_is_a_directory_is_found_before_training(tiny_root, tmp_path, capsys, name):
    """With --overwrite, found after the first epoch had replaced the earlier checkpoint."""
    run_dir = tmp_path / "run"
    assert main(["--data-root", tiny_root, *FAST, "--epochs", "1", "--output-dir", str(run_dir)]) == 0
    os.remove(run_dir / name)
    (run_dir / name).mkdir()

    def snapshot():
        return {p.name: p.read_bytes() if p.is_file() else "dir" for p in run_dir.iterdir()}

    before = snapshot()
    argv = ["--data-root", tiny_root, *FAST, "--epochs", "1", "--seed", "4", "--output-dir", str(run_dir), "--overwrite"]
    code, err = _call(argv, capsys)
    assert code == 2 and f"--output-dir {run_dir}: its {name} is a directory, where this run writes a file" in err, err
    assert snapshot() == before


def test_run_eval_only_takes_the_checkpoints_settings(tmp_path):
    """run(eval_only=True) evaluated whatever Config it was given (scale 2 doubled the mAP, class
    threshold 0.9 gave 0), where the command refuses model settings with --eval-only."""
    cfg = engine.Config(**dict(engine.SYNTHETIC_PRESET, epochs=1))
    engine.run(cfg, output_dir=str(tmp_path / "run"), progress=False, quiet=True)
    path = str(tmp_path / "run" / engine.CHECKPOINT)
    saved = engine.Config.from_dict(engine.load_checkpoint(path)["config"])
    for change in (dict(scale=2.0), dict(class_threshold=0.9)):
        with pytest.raises(engine.UsageError, match=rf"^config: an evaluation of a checkpoint takes its settings \({next(iter(change))}: "):
            engine.run(dataclasses.replace(saved, **change), eval_only=True, checkpoint=path, save=False, progress=False, quiet=True)
    # Where the data is and how it runs may differ.
    result = engine.run(dataclasses.replace(saved, threads=2, tious=(0.5,)), eval_only=True, checkpoint=path, save=False,
                        progress=False, quiet=True)
    assert list(result["map"]) == [engine.tiou_key(0.5)]


def test_an_epoch_whose_checkpoint_cannot_be_written_is_said_in_the_log(tiny_root, tmp_path, capsys, monkeypatch):
    """A full disk at epoch 2's checkpoint: train.log held epoch 2 (and its refresh) with no word of
    the failure. Now the line under it says so, and the resumed run logs epoch 2 again after its
    "loaded" line."""
    import errno

    run_dir = tmp_path / "run"
    write, checkpoints = engine._write_atomic, []

    def disk_full_at_the_second_checkpoint(path, *args, **kwargs):
        if path.endswith(engine.CHECKPOINT):
            checkpoints.append(path)
            if len(checkpoints) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(path, *args, **kwargs)

    monkeypatch.setattr(engine, "_write_atomic", disk_full_at_the_second_checkpoint)
    code, err = _call(["--data-root", tiny_root, *FAST, "--epochs", "3", "--output-dir", str(run_dir)], capsys)
    assert code == 2 and "cannot write the checkpoint (No space left on device); the previous one is kept" in err, err
    lines = (run_dir / "train.log").read_text().splitlines()
    assert [r["epoch"] for r in _epoch_records(run_dir)] == [1, 2]
    assert lines[-1].startswith("stopped: ") and "cannot write the checkpoint" in lines[-1], lines
    assert lines[-1].endswith("(epoch 2 above is not in the checkpoint; --resume trains it again)"), lines[-1]
    monkeypatch.undo()
    assert main(["--resume", str(run_dir / "checkpoint.pt"), "--no-progress", "--quiet"]) == 0
    assert [r["epoch"] for r in _epoch_records(run_dir)] == [1, 2, 2, 3]
    lines = (run_dir / "train.log").read_text().splitlines()
    stopped = next(i for i, line in enumerate(lines) if line.startswith("stopped: "))
    loaded = next(i for i, line in enumerate(lines) if line.startswith("loaded "))
    assert stopped < loaded and lines[loaded].endswith("(epoch 1)"), lines


def test_an_interrupted_write_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "results.json")
    engine._write_atomic(path, lambda f: f.write("old"))

    def write(f):
        f.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        engine._write_atomic(path, write)
    assert os.listdir(tmp_path) == ["results.json"] and (tmp_path / "results.json").read_text() == "old"


def test_a_new_folder_of_a_run_stopped_in_its_first_epoch_says_there_is_nothing_to_resume(tiny_root, tmp_path, capsys,
                                                                                           monkeypatch):
    run_dir = tmp_path / "run"
    train_epoch = engine.Trainer.train_epoch

    def interrupted(self, epoch):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine.Trainer, "train_epoch", interrupted)
    argv = ["--data-root", tiny_root, *FAST, "--epochs", "1", "--output-dir", str(run_dir)]
    assert _call(argv, capsys)[0] == 130
    assert os.listdir(run_dir) == ["train.log"]  # it says why the run stopped
    assert (run_dir / "train.log").read_text().endswith("\nstopped: interrupted in epoch 1\n")
    monkeypatch.setattr(engine.Trainer, "train_epoch", train_epoch)
    code, err = _call(argv, capsys)
    assert code == 2 and "already holds train.log from another run, which has no checkpoint.pt to resume" in err, err
    assert "--resume" not in err and "pass --overwrite to replace it" in err
    assert _call(argv + ["--overwrite"], capsys)[0] == 0
    assert sorted(os.listdir(run_dir)) == ["checkpoint.pt", "results.json", "train.log"]


def test_resume_into_another_folder_makes_it_that_runs_folder(tiny_root, tmp_path, capsys):
    """A finished run resumed (no epoch left) into a folder of another run, --overwrite: the
    folder's checkpoint, log and results are all the resumed run's (its log was held back for
    a checkpoint that never came, beside the other run's)."""
    first, other = tmp_path / "first", tmp_path / "other"
    assert main(["--data-root", tiny_root, *FAST, "--epochs", "1", "--seed", "1", "--output-dir", str(first)]) == 0
    assert main(["--data-root", tiny_root, *FAST, "--epochs", "1", "--seed", "5", "--output-dir", str(other)]) == 0
    ckpt = str(first / "checkpoint.pt")
    assert main(["--resume", ckpt, "--output-dir", str(other), "--overwrite", "--no-progress", "--quiet"]) == 0
    assert torch.load(other / "checkpoint.pt", weights_only=True)["config"]["seed"] == 1
    assert '"seed": 1' in (other / "train.log").read_text() and '"seed": 5' not in (other / "train.log").read_text()
    assert _results(str(other))["config"]["seed"] == 1


def test_resume_of_a_copy_beside_a_run_leaves_that_run_alone(tiny_root, tmp_path, capsys):
    """A backup checkpoint resumed where it lies, beside its folder's own run (later epochs):
    refused before anything is written (it used to replace the folder's checkpoint and
    results and append to its log); continued elsewhere with --output-dir."""
    run_dir = tmp_path / "run"
    assert main(["--data-root", tiny_root, *FAST, "--epochs", "2", "--stop-after", "1", "--output-dir", str(run_dir)]) == 0
    backup = run_dir / "epoch1.pt"
    shutil.copyfile(run_dir / "checkpoint.pt", backup)
    assert main(["--resume", str(run_dir / "checkpoint.pt"), "--no-progress", "--quiet"]) == 0
    saved = {name: (run_dir / name).read_bytes() for name in ("checkpoint.pt", "train.log", "results.json")}
    code, err = _call(["--resume", str(backup), "--epochs", "3", "--no-progress", "--quiet"], capsys)
    assert code == 2 and f"--resume {backup}: {run_dir} holds the files of another run" in err, err
    assert {name: (run_dir / name).read_bytes() for name in saved} == saved
    other = tmp_path / "other"
    assert main(["--resume", str(backup), "--epochs", "3", "--output-dir", str(other), "--no-progress", "--quiet"]) == 0
    assert [r["epoch"] for r in _epoch_records(other)] == [2, 3]
    assert {name: (run_dir / name).read_bytes() for name in saved} == saved


def test_resume_of_a_finished_run_keeps_its_results(tiny_root, tmp_path, capsys):
    """Nothing left to train and results.json there: resuming would only evaluate again (here
    at other thresholds) and replace them, so it is refused; --overwrite allows it."""
    run_dir = tmp_path / "run"
    assert main(["--data-root", tiny_root, *FAST, "--epochs", "1", "--output-dir", str(run_dir)]) == 0
    ckpt = str(run_dir / "checkpoint.pt")
    saved = {name: (run_dir / name).read_bytes() for name in ("checkpoint.pt", "train.log", "results.json")}
    code, err = _call(["--resume", ckpt, "--tiou", "0.5", "--no-progress", "--quiet"], capsys)
    assert code == 2 and f"--resume {ckpt}: the run has trained all 1 epochs" in err and "--eval-only" in err, err
    assert {name: (run_dir / name).read_bytes() for name in saved} == saved
    argv = ["--resume", ckpt, "--tiou", "0.5", "--output-dir", str(run_dir), "--overwrite", "--no-progress", "--quiet"]
    assert main(argv) == 0
    assert list(_results(str(run_dir))["map"]) == ["0.5"]


def test_resume_finds_its_folder_through_a_link_and_its_data_from_elsewhere(tiny_root, tmp_path, capsys, monkeypatch):
    """--output-dir spelt through a symbolic link is the resumed run's own folder (its log is
    appended to, not refused or replaced); a relative --data-root is saved absolute, and a
    resumed run may name its data again from another folder."""
    monkeypatch.chdir(os.path.dirname(tiny_root))
    run_dir = tmp_path / "run"
    rel = os.path.basename(tiny_root)
    assert main(["--data-root", rel, *FAST, "--epochs", "3", "--stop-after", "1", "--output-dir", str(run_dir)]) == 0
    config = torch.load(run_dir / "checkpoint.pt", weights_only=True)["config"]
    assert config["data_root"] == os.path.abspath(tiny_root)
    monkeypatch.chdir(tmp_path)
    os.symlink(run_dir, tmp_path / "link")
    log = (run_dir / "train.log").read_text()
    ckpt = str(run_dir / "checkpoint.pt")
    assert main(["--resume", ckpt, "--output-dir", "link", "--stop-after", "1", "--no-progress", "--quiet"]) == 0
    assert (run_dir / "train.log").read_text().startswith(log)
    assert [r["epoch"] for r in _epoch_records(run_dir)] == [1, 2]
    # Another spelling of the same data (here through a link) is accepted.
    os.symlink(tiny_root, tmp_path / "data")
    assert main(["--resume", ckpt, "--data-root", "data", "--no-progress", "--quiet"]) == 0
    assert [r["epoch"] for r in _epoch_records(run_dir)] == [1, 2, 3]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("config"), "it has no 'config'"),
        (lambda s: s.pop("optimizer"), "it has no 'optimizer'"),
        (lambda s: s.update(config="x"), "its 'config' is not a dict of settings"),
        (lambda s: s.update(epoch="x"), "its 'epoch' is not an int >= 0 (got 'x')"),
        (lambda s: s.update(epoch=-3), "its 'epoch' is not an int >= 0 (got -3)"),
        (lambda s: s.update(epoch=2.0), "its 'epoch' is not an int >= 0 (got 2.0)"),
        (lambda s: s.update(history=None), "its 'history' is not a list (got None)"),
        (lambda s: s.update(pseudo_labels="x"), "its 'pseudo_labels' is not a 3-d float tensor (got 'x')"),
        (lambda s: s.update(pseudo_labels=torch.zeros(2, 3, dtype=torch.int64)),
         "its 'pseudo_labels' is not a 3-d float tensor (got a 2-d int64 tensor)"),
        (lambda s: s.update(optimizer={}), "its 'optimizer' is not an optimizer state (state, param_groups) (got dict)"),
        (lambda s: s["config"].update(dataset=""), "its setting dataset = '' is not possible"),
        (lambda s: s["config"].update(embed_dim="abc"), "its setting embed_dim = 'abc' is not possible"),
        (lambda s: s["config"].update(streams=["bogus"]), "its setting streams = ['bogus'] is not possible"),
        # A set the flags do not make: the losses have no distillation for it.
        (lambda s: s["config"].update(streams=["rgb", "fused"]), "its setting streams = ['rgb', 'fused'] is not possible"),
        (lambda s: s["config"].update(dropout=1.5), "its setting dropout = 1.5 is not possible"),
        (lambda s: s["config"].update(tious=[0.5, 2.0]), "its setting tious = [0.5, 2.0] is not possible"),
        (lambda s: s["config"].update(tious=[]), "its setting tious = [] is not possible"),
        (lambda s: s["config"].update(feature_type="C3D"), "its setting feature_type = 'C3D' is not possible"),
        # Values the flags refuse: a hand-edited checkpoint gets the same bounds.
        (lambda s: s["config"].update(threads=10**9), "its setting threads = 1000000000 is not possible"),
        (lambda s: s["config"].update(seed=2**40), f"its setting seed = {2**40} is not possible"),
        (lambda s: s["config"].update(lr_decay_at=5), "its setting lr_decay_at = 5 is not possible"),
        (lambda s: s["config"].update(pseudo_threshold=7.0), "its setting pseudo_threshold = 7.0 is not possible"),
        (lambda s: s["config"].update(embed_dim=10**6), "its setting embed_dim = 1000000 is not possible"),
        (lambda s: s["config"].update(lr=1e30), "its setting lr = 1e+30 is not possible"),
        (lambda s: s["config"].update(beta2=1.0), "its setting beta2 = 1.0 is not possible"),
        (lambda s: s["config"].update(lr=0.0), "its setting lr = 0.0 is not possible"),
        (lambda s: s["config"].update(feature_type=["I3D"]), "its setting feature_type = ['I3D'] is not possible"),
        (lambda s: s["config"].update(batch_size=0), "its setting batch_size = 0 is not possible"),
        # Settings without flags: a zero eval batch failed in range(), a zero scale or a class
        # threshold past 1 evaluated to mAP 0.
        (lambda s: s["config"].update(eval_batch_size=0), "its setting eval_batch_size = 0 is not possible"),
        (lambda s: s["config"].update(scale=0.0), "its setting scale = 0.0 is not possible"),
        (lambda s: s["config"].update(class_threshold=50.0), "its setting class_threshold = 50.0 is not possible"),
        (lambda s: s["pseudo_conf"].fill_(float("nan")), "its 'pseudo_conf' hold NaN or inf"),
        # Resumed, it failed with an IndexError at the next refresh.
        (lambda s: s.update(pseudo_conf=torch.zeros(1, 2, 2)), "its 'pseudo_conf' has shape (1, 2, 2), its 'pseudo_labels' (3, 12, "),
        (lambda s: s.update(train_videos=5), "its 'train_videos' is not a list of names (got 5)"),
        (lambda s: s.update(classes=[1, 2]), "its 'classes' is not a list of names (got list)"),
        (lambda s: s.update(splits="test"), "its 'splits' is not two different subset names, train then test (got 'test')"),
        (lambda s: s.update(splits=["test", "test"]), "its 'splits' is not two different subset names"),
        (lambda s: s.update(splits=["a", "b", "c"]), "its 'splits' is not two different subset names"),
        # Accepted, it made results.json record epoch 99 of a run of 1.
        (lambda s: s.update(epoch=99), "its 'epoch' is 99, past its setting epochs = 1"),
        (lambda s: s["config"].pop("epochs") and s.update(epoch=241), "its 'epoch' is 241, past its setting epochs = 240"),
        # Weights no run of ours saves: resumed, they "diverged" at any --lr.
        (lambda s: s["model"]["rgb_out.0.bias"].__setitem__(3, float("inf")), "its weights hold NaN or inf (first in 'rgb_out.0.bias')"),
        (lambda s: s["model"]["fg_centres"].fill_(float("nan")), "its weights hold NaN or inf (first in 'fg_centres')"),
        (lambda s: s["optimizer"]["state"][2]["exp_avg"].fill_(float("nan")),
         "its optimizer state holds NaN or inf (first in parameter 2's 'exp_avg')"),
    ],
)
def test_a_checkpoint_with_bad_contents_is_refused_by_name(tiny_root, tmp_path, capsys, edit, message):
    run_dir = tmp_path / "run"
    assert main(["--data-root", tiny_root, *FAST, "--epochs", "1", "--output-dir", str(run_dir)]) == 0
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    edit(state)
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    for argv in (["--resume", str(bad)], ["--eval-only", "--checkpoint", str(bad), "--output-dir", str(tmp_path / "e")]):
        code, err = _call(argv + ["--no-progress", "--quiet"], capsys)
        assert code == 2 and f"{bad}: an mmsd_ext.train checkpoint, but {message}" in err, err


def test_a_checkpoint_with_more_refreshes_than_any_run_has_epochs_is_refused(tiny_root, tmp_path):
    """pseudo_refreshes = 1e12 passed the checks, then --resume hung placing the refreshes."""
    run_dir = tmp_path / "run"
    assert main(["--data-root", tiny_root, *FAST, "--epochs", "1", "--output-dir", str(run_dir)]) == 0
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    for refreshes, accepted in ((engine.MAX_EPOCHS, True), (engine.MAX_EPOCHS + 1, False), (10**12, False)):
        state["config"]["pseudo_refreshes"] = refreshes
        torch.save(state, tmp_path / "edited.pt")
        if accepted:
            engine.load_checkpoint(str(tmp_path / "edited.pt"))
            continue
        with pytest.raises(engine.UsageError, match=rf"but its setting pseudo_refreshes = {refreshes} is not possible$"):
            engine.load_checkpoint(str(tmp_path / "edited.pt"))
    with pytest.raises(ValueError, match=r"^config: the setting pseudo_refreshes = 1000000000000 is not possible$"):
        engine.run(engine.Config(pseudo_refreshes=10**12), save=False, progress=False, quiet=True)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda o: o["param_groups"].append(dict(o["param_groups"][0], params=[])), "number of parameter groups"),
        (lambda o: o["param_groups"][0]["params"].pop(), "doesn't match the size of optimizer's group"),
        (lambda o: o["state"][3].update(exp_avg=torch.zeros(3)), "'exp_avg' of "),
        (lambda o: o["state"][3].pop("exp_avg_sq"), "has no 'exp_avg_sq'"),
        (lambda o: o["state"][3].update(step=torch.zeros(2)), "'step' of "),
    ],
)
def test_an_optimizer_state_that_does_not_fit_is_refused(tiny_root, tmp_path, capsys, edit, message):
    """Each failed with torch's ValueError or in the first Adam step, after loading."""
    run_dir = tmp_path / "run"
    assert main(["--data-root", tiny_root, *FAST, "--epochs", "1", "--output-dir", str(run_dir)]) == 0
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    edit(state["optimizer"])
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    code, err = _call(["--resume", str(bad), "--epochs", "2", "--no-progress", "--quiet"], capsys)
    assert code == 2 and "the checkpoint's optimizer state does not fit the model" in err and message in err, err
    assert not (tmp_path / "checkpoint.pt").exists()


def test_a_checkpoints_optimizer_settings_come_from_its_config(tiny_root, tmp_path):
    """Adam's betas, eps and weight decay are the config's; hand-edited group values (here betas
    of one number, which failed in the first step) are not used: the resumed run equals one
    resumed from the unedited checkpoint."""
    run_dir = tmp_path / "run"
    assert main(["--data-root", tiny_root, *FAST, "--epochs", "1", "--output-dir", str(run_dir)]) == 0
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    for name, edit in (("good", lambda g: None), ("edited", lambda g: g.update(betas=(0.5,), eps=3.0))):
        edit(state["optimizer"]["param_groups"][0])
        (tmp_path / name).mkdir()
        torch.save(state, tmp_path / name / "checkpoint.pt")
        assert main(["--resume", str(tmp_path / name / "checkpoint.pt"), "--epochs", "2", "--no-progress", "--quiet"]) == 0
    good, edited = (torch.load(tmp_path / n / "checkpoint.pt", weights_only=True) for n in ("good", "edited"))
    for key, value in good["model"].items():
        assert torch.equal(value, edited["model"][key]), key
    assert edited["optimizer"]["param_groups"][0]["betas"] == good["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.99)


def test_a_folder_given_as_the_checkpoint_is_named_as_one(tiny_root, tmp_path, capsys):
    """A run's folder given to --resume or --checkpoint: it said "checkpoint not found"."""
    run_dir = tmp_path / "run"
    assert main(["--data-root", tiny_root, *FAST, "--epochs", "1", "--output-dir", str(run_dir)]) == 0
    (tmp_path / "empty").mkdir()
    for folder, hint in [(run_dir, f"; its run's checkpoint is {run_dir}/checkpoint.pt"), (tmp_path / "empty", " (and holds no checkpoint.pt)")]:
        for argv in (["--resume", str(folder)], ["--eval-only", "--checkpoint", str(folder), "--output-dir", str(tmp_path / "e")]):
            code, err = _call(argv + ["--no-progress", "--quiet"], capsys)
            assert code == 2 and err == f"mmsd-train: error: {folder}: a directory, not a checkpoint{hint}\n", err
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("device", ["gpu", "tpu", "cuda:x", "cuda:-1", "cpu:1"])
def test_a_device_this_program_cannot_use_is_refused_with_the_choices(tiny_root, tmp_path, capsys, device):
    """torch's message listed some twenty device types (ipu, xpu, mkldnn, ...) this program cannot run on."""
    code, err = _call(["--data-root", tiny_root, *FAST, "--device", device, "--output-dir", str(tmp_path / "run")], capsys)
    assert code == 2 and err == f"mmsd-train: error: --device: expected cpu, cuda or cuda:N, got {device!r}\n", err
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_is_read_without_running_its_code(tiny_root, tmp_path, capsys):
    # weights_only loading: a pickled object other than tensors and plain containers is refused.
    import datetime

    run_dir = tmp_path / "run"
    assert main(["--data-root", tiny_root, *FAST, "--epochs", "1", "--output-dir", str(run_dir)]) == 0
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    state["history"].append(datetime.date(2026, 1, 1))
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    code, err = _call(["--resume", str(bad), "--no-progress", "--quiet"], capsys)
    assert code == 2 and f"{bad}: not a readable checkpoint (it holds a datetime.date object;" in err, err
    assert "weights_only" not in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize(
    "content, cause",
    [
        (lambda real: b"garbage\n", "not a torch checkpoint file"),
        (lambda real: b"", "an empty file"),
        (lambda real: real[:200], "truncated or damaged: its zip archive has no end"),
        (lambda real: real[: len(real) // 2], "truncated or damaged: its zip archive has no end"),
        (lambda real: pickle.dumps({"format": "mmsd_ext.train/1"}, protocol=2), "a plain pickle (protocol 2), not a file torch.save writes"),
        # (torch warns of the protocol before it fails; the user sees only the error)
        (lambda real: pickle.dumps({"format": "mmsd_ext.train/1"}, protocol=4), "a plain pickle (protocol 4), not a file torch.save writes"),
    ],
)
def test_a_file_that_is_no_checkpoint_says_so_in_a_few_words(tiny_root, tmp_path, capsys, content, cause):
    """torch's message for a file weights-only loading cannot read is a dozen lines advising
    weights_only=False: wrong for a file that is no checkpoint, or a truncated one."""
    run_dir = tmp_path / "run"
    assert main(["--data-root", tiny_root, *FAST, "--epochs", "1", "--output-dir", str(run_dir)]) == 0
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content((run_dir / "checkpoint.pt").read_bytes()))
    for argv in (["--resume", str(bad)], ["--eval-only", "--checkpoint", str(bad), "--output-dir", str(tmp_path / "e")]):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code, err = _call(argv + ["--no-progress", "--quiet"], capsys)
        assert not caught, [str(w.message) for w in caught]
        assert code == 2 and err.startswith(f"mmsd-train: error: {bad}: not a readable checkpoint ({cause}"), err
        assert err.strip().endswith(")") and len(err.splitlines()) == 1 and "weights_only" not in err, err


def test_unusable_output_dir_is_a_usage_error(tiny_root, tmp_path, capsys, monkeypatch):
    common = ["--data-root", tiny_root, *FAST, "--epochs", "1"]
    (tmp_path / "afile").write_text("x")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    for path, message in [
        (str(tmp_path / "afile" / "sub"), "afile/sub: cannot write there"),
        ("", "--output-dir: empty path"),
        (str(tmp_path / "dangling"), "dangling: a symbolic link"),
    ]:
        code, err = _call(common + ["--output-dir", path], capsys)
        assert code == 2 and message in err, err
    assert not (tmp_path / "nowhere").exists()

    # A write that fails during the run (disk full, folder made read-only) is an error naming
    # the file; the checkpoint of the earlier epoch is kept.
    run_dir = tmp_path / "run"
    assert main(common[:-1] + ["2", "--stop-after", "1", "--output-dir", str(run_dir)]) == 0
    kept = (run_dir / "checkpoint.pt").read_bytes()

    class FullDisk:
        """A file of a full disk: a binary write (the checkpoint's) fails as the OS fails it."""

        def __init__(self, path, mode="r", **kwargs):
            self.file, self.binary = open(path, mode, **kwargs), "b" in mode

        def write(self, data):
            if not self.binary:
                return self.file.write(data)
            self.file.write(bytes(data)[:100])
            raise OSError(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    monkeypatch.setattr(engine, "open", FullDisk, raising=False)  # the module's open, not the builtin
    code, err = _call(["--resume", str(run_dir / "checkpoint.pt"), "--quiet", "--no-progress"], capsys)
    assert code == 2 and "checkpoint.pt: cannot write the checkpoint (No space left on device); the previous one is kept" in err
    assert (run_dir / "checkpoint.pt").read_bytes() == kept
    assert not (run_dir / "checkpoint.pt.tmp").exists()
    # The first checkpoint of a new folder: there is no previous one to keep.
    code, err = _call(common[:-1] + ["2", "--output-dir", str(tmp_path / "new")], capsys)
    assert code == 2 and err.rstrip().endswith("checkpoint.pt: cannot write the checkpoint (No space left on device)"), err
    assert not (tmp_path / "new" / "checkpoint.pt").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_dir(tiny_root, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code, err = _call(["--data-root", tiny_root, *FAST, "--epochs", "1", "--output-dir", str(ro)], capsys)
    finally:
        ro.chmod(0o755)
    assert code == 2 and "ro: cannot write there" in err


def test_same_seed_same_numbers(tiny_root):
    config = engine.Config(
        data_root=tiny_root, dataset="Synthetic", epochs=2, batch_size=4, lr=1e-3, embed_dim=16, seed=3, device="cpu"
    )
    first = engine.run(config, save=False, progress=False, quiet=True)
    second = engine.run(config, save=False, progress=False, quiet=True)
    assert first["map"] == second["map"] and first["cmap"] == second["cmap"]


_FAILING_RANK0 = """
import sys
from mmsd_ext.train import engine
from mmsd_ext.train.__main__ import main

save = engine.Trainer.save_checkpoint


def failing_save(self):
    if self.ddp.main and self.epoch == 2:
        raise engine.UsageError("cannot write the checkpoint (a stand-in for a full disk)")
    return save(self)


engine.Trainer.save_checkpoint = failing_save
sys.exit(main())
"""


def test_ddp_rank0_failing_mid_run_stops_every_rank_without_torchrun(tiny_root, tmp_path):
    """Two processes started as srun or a script per rank would (RANK, WORLD_SIZE, MASTER_*;
    no torchrun to end the others): rank 0 fails to write its checkpoint after epoch 2, and
    rank 1 stops with an error that says so (exit 2). Before 2026-11-27 rank 1 went on to its
    next collective, where gloo failed with a "Connection closed by peer" traceback (exit 1)."""
    import socket

    script = tmp_path / "failing_rank0.py"
    script.write_text(_FAILING_RANK0)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [sys.executable, str(script), "--data-root", tiny_root, *FAST, "--epochs", "4", "--dropout", "0"]
    argv += ["--output-dir", str(tmp_path / "run")]
    base = dict(os.environ, OMP_NUM_THREADS="1", MMSD_EXT_QUIET="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2")
    procs = [
        subprocess.Popen(argv, env=dict(base, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in (0, 1)
    ]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    (_, err0), (_, err1) = outs
    assert procs[0].returncode == 2, err0[-3000:]
    assert "cannot write the checkpoint (a stand-in for a full disk)" in err0
    assert procs[1].returncode == 2, err1[-3000:]
    assert "rank 0 stopped with an error" in err1
    log = (tmp_path / "run" / "train.log").read_text()
    # Epoch 2 is logged, then its checkpoint fails: the line under it says so.
    assert '"epoch": 2' in log and '"epoch": 3' not in log
    assert log.endswith("stopped: cannot write the checkpoint (a stand-in for a full disk) (epoch 2 above is not in "
                        "the checkpoint; --resume trains it again)\n"), log


def test_ddp_two_processes_match_one(tiny_root, tmp_path):
    """torchrun with 2 CPU processes (gloo): each takes half of every step's videos; without
    dropout the result equals the single-process run up to float summation order."""
    common = ["--data-root", tiny_root, *FAST, "--epochs", "3", "--dropout", "0"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert main(common + ["--output-dir", one]) == 0
    # PYTHONFAULTHANDLER: a rank that dies on a signal prints every thread's Python stack to the
    # stderr shown below. Rank 1 used to abort at exit now and then ("terminate called without an
    # active exception", 4 of 64 suite runs): a gloo worker thread still waiting for the GIL when
    # the interpreter shut down; Dist.close says more (2026-11-27).
    env = dict(os.environ, OMP_NUM_THREADS="1", MMSD_EXT_QUIET="1", PYTHONFAULTHANDLER="1")
    # --log-dir: torchrun's per-run folder goes under tmp_path, not /tmp/torchelastic_*, which it leaves behind.
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--log-dir", str(tmp_path / "elastic")]
    cmd = launcher + ["-m", "mmsd_ext.train"]
    proc = subprocess.run(cmd + common + ["--output-dir", two], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-12000:]
    r1, r2 = _results(one), _results(two)
    assert r2["processes"] == 2 and r1["processes"] == 1
    s1 = torch.load(os.path.join(one, "checkpoint.pt"), weights_only=True)
    s2 = torch.load(os.path.join(two, "checkpoint.pt"), weights_only=True)
    for key, value in s1["model"].items():
        torch.testing.assert_close(s2["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    for t in r1["map"]:
        assert abs(r1["map"][t] - r2["map"][t]) < 1.0
    fresh = engine.build_model(engine.Config(embed_dim=16), data_mod.load_wtalc(tiny_root, "Synthetic")).state_dict()
    assert not torch.allclose(fresh["centres"], s2["model"]["centres"])  # it did train

    # An error on rank 0 (its output folder holds a finished run) stops every rank, no hang.
    again = subprocess.run(cmd + common + ["--output-dir", two], env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "--overwrite" in again.stderr
    assert _results(two) == r2



@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "--steps: expected at least 1"),
        (["--threads", "-1"], "--threads: expected 0"),
        (["--device", "tpu"], "--device:"),
        (["--backends", "bogus"], "--backends bogus:"),
        (["--device", "cuda:7" if torch.cuda.is_available() else "cuda"], "--device cuda"),
    ],
)
def test_throughput_bad_flags(argv, message, capsys):
    from mmsd_ext.train import throughput

    with pytest.raises(SystemExit) as exit_info:
        throughput.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        # Before: "Overflow when unpacking long" from torch.set_num_threads, in a traceback.
        (["--threads", "99999999999999"], f"--threads: expected 0 (torch's) to {MAX_THREADS}, got 99999999999999"),
        (["--threads", str(MAX_THREADS + 1)], f"--threads: expected 0 (torch's) to {MAX_THREADS}"),
        # Before: ten million 2048-d videos were allocated, and the allocation failed in a traceback.
        (["--steps", "1000000"], "--steps: expected at least 1 and at most 20 (one epoch), got 1000000"),
        (["--steps", "21"], "--steps: expected at least 1 and at most 20 (one epoch), got 21"),
    ],
)
def test_throughput_out_of_range_threads_and_steps_are_refused(argv, message, capsys, monkeypatch):
    from mmsd_ext.train import throughput

    def no_data(*args, **kwargs):
        pytest.fail("the videos were made for a flag that should have been refused")

    monkeypatch.setattr(throughput, "thumos_like", no_data)
    threads = torch.get_num_threads()
    with pytest.raises(SystemExit) as info:
        throughput.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert torch.get_num_threads() == threads


@pytest.mark.skipif("cpu" not in mmsd_ext.available_backends(), reason="the compiled extension is not built")
def test_throughput_header_names_what_auto_picks_whatever_the_environment_asks(monkeypatch):
    # Its header says which backend the "auto" rows time; MMSD_EXT_BACKEND (read at import, and
    # by backend=None) must not change it.
    from mmsd_ext import _backend
    from mmsd_ext.train import throughput

    monkeypatch.setattr(_backend, "_global_override", "reference")
    assert _backend.resolve("topk_mil_pool", None, "cpu") == "reference"
    for op in ("topk_mil_pool", "mmsd_distill_loss"):
        assert throughput._resolved(op, torch.device("cpu")) == "cpu"


def test_throughput_names_a_malformed_torchrun_variable(capsys, monkeypatch):
    # As the training CLI: it was a traceback from the process environment check.
    from mmsd_ext.train import throughput

    def no_data(*args, **kwargs):
        pytest.fail("the videos were made for an environment that should have been refused")

    monkeypatch.setattr(throughput, "thumos_like", no_data)
    for name in engine.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "abc")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as info:
        throughput.main(["--steps", "1"])
    assert info.value.code == 2
    assert "error: environment variable WORLD_SIZE: expected an integer >= 1, got 'abc'" in capsys.readouterr().err


def test_throughput_resolves_a_cuda_device(capsys, monkeypatch):
    # --device cuda goes through the training's device rules as a single process (it passed an
    # object without the fields those rules read); with CUDA faked present, it reaches the
    # backend check on cuda:0.
    from mmsd_ext.train import throughput

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    class Reached(Exception):
        pass

    def check_backend(backend, device, **_):
        raise Reached(backend, device)

    monkeypatch.setattr(throughput, "check_backend", check_backend)
    with pytest.raises(Reached) as info:
        throughput.main(["--device", "cuda", "--steps", "1", "--backends", "reference"])
    assert info.value.args == ("reference", torch.device("cuda", 0))


def test_throughput_header_reports_the_threads_asked_for(capsys, monkeypatch):
    from mmsd_ext.train import throughput

    # Before, the header was printed before --threads was applied: it showed torch's default.
    monkeypatch.setattr(throughput, "measure", lambda backend, data, steps, threads, device: (0.1, 0.01))
    before = torch.get_num_threads()
    asked = 3 if before != 3 else 2
    try:
        assert throughput.main(["--threads", str(asked), "--steps", "1", "--backends", "reference"]) == 0
    finally:
        torch.set_num_threads(before)
    err = capsys.readouterr().err
    assert f"device cpu, {asked} threads;" in err, err


@pytest.mark.skipif("cpu" not in mmsd_ext.available_backends(), reason="the compiled extension is not built")
def test_throughput_table():
    # One timed step on the CPU kernels: the table names the backend and its times.
    done = subprocess.run(
        [sys.executable, "-m", "mmsd_ext.train.throughput", "--steps", "1", "--backends", "cpu"],
        capture_output=True, text=True, cwd="/", timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    row = [line for line in done.stdout.splitlines() if line.startswith("| cpu |")]
    assert len(row) == 1
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert cells[1].endswith(" ms") and float(cells[1][:-3]) > 0
    assert cells[3].endswith(" ms") and float(cells[3][:-3]) > 0


def test_run_takes_numpy_settings_and_saves_them_as_python_numbers(tiny_root, tmp_path):
    # Before 2026-11-28 np.int64 and np.bool_ settings were refused as "not possible", and
    # numpy floats or an array of tIoUs reached the checkpoint, which then could not be loaded.
    config = engine.Config(
        data_root=tiny_root, dataset="Synthetic", epochs=np.int64(1), batch_size=np.int32(4), lr=np.float32(1e-3),
        embed_dim=np.int64(16), distill=np.bool_(True), tious=np.array([0.3, 0.5]), device="cpu",
    )
    run_dir = tmp_path / "run"
    trained = engine.run(config, output_dir=str(run_dir), progress=False, quiet=True)
    assert sorted(trained["map"]) == ["0.3", "0.5"]
    saved = engine.load_checkpoint(str(run_dir / engine.CHECKPOINT))["config"]
    assert saved["epochs"] == 1 and type(saved["epochs"]) is int and type(saved["distill"]) is bool
    assert type(saved["lr"]) is float and saved["tious"] == [0.3, 0.5] and all(type(t) is float for t in saved["tious"])
    evaluated = engine.run(
        engine.Config(data_root=tiny_root, dataset="Synthetic", embed_dim=16, tious=(0.3, 0.5), device="cpu"), eval_only=True,
        checkpoint=str(run_dir / engine.CHECKPOINT), save=False, progress=False, quiet=True,
    )
    assert evaluated["map"] == trained["map"]


def test_run_refuses_a_config_the_flags_could_not_make():
    # engine.run checks a Config built in code as it checks a checkpoint's settings.
    for config, message in [
        (engine.Config(streams=("rgb", "fused")), "config: the setting streams = ['rgb', 'fused'] is not possible"),
        (engine.Config(batch_size=0), "config: the setting batch_size = 0 is not possible"),
    ]:
        with pytest.raises(ValueError, match=rf"^{re.escape(message)}$"):
            engine.run(config, save=False, progress=False, quiet=True)
