"""An embedded synthetic WTAL dataset in the W-TALC layout, generated deterministically from a seed.

What it models (all knobs are arguments of ``make_arrays``):

- Videos of ``min_length``..``max_length`` snippets (log-uniform), each with one or two
  action classes (multi-label) and one to four instances per class, the rest background.
  Ground truth is stored in seconds (snippet * 16 / 25 for I3D features, as in THUMOS14;
  ``snippets_per_second`` sets another rate).
- Features: RGB half then flow half, ``modality_dim`` each. Background is a per-video scene
  (a mixture of shared background prototypes) plus temporally correlated noise.
- Complementary modalities: even classes are "appearance" classes, visible mainly in RGB
  (pattern strength ``signal`` = 0.8 in RGB inside their instances, ``weak_signal`` = 0.45
  in flow); odd classes are "motion" classes, visible mainly in flow.
- Distractors: background stretches (about ``distractors_per_label`` per label) where a
  label's pattern shows in its main modality only (a scene that looks like the action,
  camera motion that moves like it): a stream that sees one modality fires there, the other
  modality says background. This is what MMSD's distillation and voting between the
  streams are for.
- Actionness: every instance, whatever its class, also carries a shared pattern (strength
  ``actionness``, scaled like the class pattern in each modality): the class-agnostic cue
  that MMSD's foreground attention learns, as people moving are in I3D features.
- Optional context (``context``, ``global_context``; off by default): a class's context
  pattern in its other modality, strong within 0.5 to 1.5 instance lengths of each instance
  and weak over the whole video (with it on, the streams disagree so much that MMSD's
  distillation dominates training; kept for experiments).
- Instances fade in and out over a few snippets, and carry instance-specific variation.
- Some test videos hold an ambiguous, weaker instance outside the ground truth, listed in
  ``Ambiguous_test.txt`` as THUMOS14 does.
"""

import os

import numpy as np

from .data import AMBIGUOUS_FILE, FEATURE_RATES, SNIPPETS_PER_SECOND, WTALCData, features_file

NAME = "Synthetic"
PATTERN_NORM = 8.0


def make_arrays(
    seed=0,
    *,
    num_classes=8,
    modality_dim=256,
    num_train=160,
    num_test=80,
    min_length=50,
    max_length=800,
    signal=0.8,
    weak_signal=0.45,
    context=0.0,
    global_context=0.0,
    distractor=0.7,
    distractors_per_label=1.5,
    actionness=0.25,
    noise=1.0,
    noise_smoothness=0.6,
    num_background=6,
    background=0.6,
    snippets_per_second=SNIPPETS_PER_SECOND,
):
    """The dataset's arrays exactly as the W-TALC files hold them (plus ``ambiguous`` rows).

    Same arguments, same arrays, bit for bit, on any machine (numpy's PCG64 generator).
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED]))
    F = modality_dim

    def unit(n):
        # Patterns of norm 8 whatever the width, so that a pattern's visibility against the
        # per-dimension noise (its projection SNR) does not change with modality_dim.
        v = rng.standard_normal((n, F))
        return v / np.linalg.norm(v, axis=1, keepdims=True) * PATTERN_NORM

    # Per class: its action pattern and its context pattern in each modality.
    action = {"rgb": unit(num_classes), "flow": unit(num_classes)}
    ctx = {"rgb": unit(num_classes), "flow": unit(num_classes)}
    bg_protos = {"rgb": unit(num_background), "flow": unit(num_background)}
    # What every action shares whatever its class (people moving): the cue a class-agnostic
    # attention can pick up, as it does in I3D features.
    acting = {"rgb": unit(1)[0], "flow": unit(1)[0]}
    classes = [f"class_{c:02d}_{'appearance' if c % 2 == 0 else 'motion'}" for c in range(num_classes)]

    def strengths(c):
        # (rgb, flow) strength of class c inside its instances, and where its context lives.
        if c % 2 == 0:
            return signal, weak_signal, "flow"
        return weak_signal, signal, "rgb"

    videos = []
    for v in range(num_train + num_test):
        subset = "validation" if v < num_train else "test"
        T = int(round(np.exp(rng.uniform(np.log(min_length), np.log(max_length)))))
        n_labels = 1 if rng.random() < 0.7 else 2
        labels = sorted(rng.choice(num_classes, size=n_labels, replace=False).tolist())

        # Instances: non-overlapping, separated by background.
        budget = rng.uniform(0.15, 0.5) * T
        instances = []
        occupied = np.zeros(T, dtype=bool)
        for c in labels:
            count = int(rng.integers(1, 5))
            for _ in range(count):
                length = int(np.clip(rng.normal(budget / (count * len(labels)), 0.3 * budget / count), 4, max(4, T // 3)))
                for _try in range(20):
                    start = int(rng.integers(0, max(1, T - length)))
                    end = min(T, start + length)
                    lo, hi = max(0, start - 2), min(T, end + 2)
                    if end - start >= 4 and not occupied[lo:hi].any():
                        occupied[start:end] = True
                        instances.append((c, start, end))
                        break
        # Every label gets an instance, even where a short video had no room left.
        for c in sorted(set(labels) - {c for c, _, _ in instances}):
            free = np.flatnonzero(~occupied)
            start = int(free[0]) if len(free) else 0
            end = min(T, start + 4)
            occupied[start:end] = True
            instances.append((c, start, end))
        instances.sort(key=lambda x: x[1])

        # Distractors: background stretches where a label's pattern shows in its main modality
        # only (a scene that looks like the action, camera motion that moves like it).
        distractors = []
        for c in labels:
            for _ in range(rng.poisson(distractors_per_label)):
                length = int(np.clip(rng.normal(budget / (2 * len(labels)), budget / 4), 4, max(4, T // 4)))
                for _try in range(20):
                    start = int(rng.integers(0, max(1, T - length)))
                    end = min(T, start + length)
                    lo, hi = max(0, start - 3), min(T, end + 3)
                    if end - start >= 4 and not occupied[lo:hi].any():
                        occupied[start:end] = True
                        distractors.append((c, start, end))
                        break

        ambiguous = None
        if subset == "test" and rng.random() < 0.2:
            free = np.flatnonzero(~occupied)
            if len(free) > 12:
                start = int(free[rng.integers(0, len(free) - 8)])
                end = start + 8
                if not occupied[start:end].any():
                    ambiguous = (int(rng.choice(labels)), start, end)

        feats = {}
        for m in ("rgb", "flow"):
            mix = rng.dirichlet(np.ones(num_background))
            scene = background * (mix @ bg_protos[m])
            eps = rng.standard_normal((T, F))
            # AR(1) noise: neighbouring snippets look alike, as overlapping I3D windows do.
            for t in range(1, T):
                eps[t] = noise_smoothness * eps[t - 1] + np.sqrt(1 - noise_smoothness**2) * eps[t]
            x = scene[None, :] + noise * eps
            for c in labels:
                _, _, ctx_modality = strengths(c)
                if ctx_modality != m:
                    continue
                # Context: weak over the whole video, strong around (and in) each instance.
                level = np.full(T, global_context)
                for c2, start, end in instances:
                    if c2 == c:
                        reach = int(round((end - start) * rng.uniform(0.5, 1.5)))
                        level[max(0, start - reach) : min(T, end + reach)] = context
                x += level[:, None] * ctx[m][c][None, :]
            events = [(c, st, en, None) for c, st, en in instances]
            events += [(c, st, en, "distractor") for c, st, en in distractors]
            if ambiguous:
                events.append((*ambiguous, "ambiguous"))
            for c, start, end, kind in events:
                s_rgb, s_flow, _ = strengths(c)
                amp = s_rgb if m == "rgb" else s_flow
                if kind == "ambiguous":
                    amp = amp * 0.5
                elif kind == "distractor":
                    amp = distractor if amp == signal else 0.0
                    if amp == 0.0:
                        continue
                pattern = action[m][c] + 0.5 * PATTERN_NORM / np.sqrt(F) * rng.standard_normal(F)
                L = end - start
                envelope = np.ones(L)
                ramp = min(3, L // 2)
                if ramp:
                    envelope[:ramp] = np.linspace(0.4, 1.0, ramp + 2)[1:-1]
                    envelope[L - ramp :] = envelope[:ramp][::-1]
                x[start:end] += amp * envelope[:, None] * pattern[None, :]
                if kind != "distractor":
                    x[start:end] += actionness * (amp / signal) * envelope[:, None] * acting[m][None, :]
            feats[m] = x
        videos.append(
            {
                "name": f"video_{subset}_{v:07d}",
                "subset": subset,
                "features": np.concatenate([feats["rgb"], feats["flow"]], axis=1).astype(np.float32),
                "labels": [classes[c] for c in labels],
                "segments": [[s / snippets_per_second, e / snippets_per_second] for _, s, e in instances],
                "segment_labels": [classes[c] for c, _, _ in instances],
                "duration": T / snippets_per_second,
                "ambiguous": ambiguous,
            }
        )

    def objects(values):
        out = np.empty(len(values), dtype=object)
        for i, value in enumerate(values):
            out[i] = value
        return out

    return {
        "features": objects([v["features"] for v in videos]),
        "labels_all": objects([v["labels"] for v in videos]),
        "segments": objects([v["segments"] for v in videos]),
        "labels": objects([v["segment_labels"] for v in videos]),
        "classlist": np.asarray([c.encode() for c in classes]),
        "videoname": np.asarray([v["name"].encode() for v in videos]),
        "subset": np.asarray([v["subset"].encode() for v in videos]),
        "duration": np.asarray([v["duration"] for v in videos], dtype=np.float64),
        "ambiguous": [
            (v["name"], v["ambiguous"][1] / snippets_per_second, v["ambiguous"][2] / snippets_per_second)
            for v in videos
            if v["ambiguous"]
        ],
    }


def synthetic_dataset(seed=0, **kwargs):
    """The synthetic dataset as a ``WTALCData`` (through the same validation as files)."""
    return WTALCData.from_arrays(make_arrays(seed, **kwargs), NAME, source=f"<synthetic seed={seed}>")


def write(root, seed=0, name=NAME, feature_type="I3D", **kwargs):
    """Write the synthetic dataset as W-TALC files under ``<root>/<name>/``, as features of
    ``feature_type`` (the features file's name, and the rate of the seconds); returns the folder."""
    arrays = make_arrays(seed, snippets_per_second=FEATURE_RATES[feature_type], **kwargs)
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    np.save(os.path.join(folder, features_file(name, feature_type)), arrays["features"], allow_pickle=True)
    for key in ("labels_all", "segments", "labels", "classlist", "videoname", "subset", "duration"):
        np.save(os.path.join(folder, key + ".npy"), arrays[key], allow_pickle=True)
    with open(os.path.join(folder, AMBIGUOUS_FILE), "w") as f:
        for video, start, end in arrays["ambiguous"]:
            f.write(f"{video}  {start:.2f} {end:.2f}\n")
    return folder
