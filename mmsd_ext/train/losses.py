"""MMSD's training objective on padded batches, built on mmsd_ext's ops.

Every term is MMSD's per-video loss summed over the videos of the batch (MMSD runs one video
per forward and accumulates the gradients of 10 before a step, so an optimizer step sees the
sum over its videos) and over the streams:

- classification: normalised cross-entropy of the attention branch against ``[y, 0]``
  (weight ``lambda_att_branch`` = 1.0) and of the MIL branch against ``[y, 1]`` (0.5);
- attention: ``sum_c (bottom-k mean - top-k mean)(sigmoid(cas_logits)) * [y, 1]`` with
  k = max(1, floor(L / 8)) (``mmsd_ext.topk_mil_pool``), minus the mean over time of
  ``|max_action a - a_background|`` with a masked to the video's classes;
- distillation: ``mmsd_ext.mmsd_distill_loss`` at temperature 0.2 over the valid snippets.
  One deviation, forced by batching: the op averages over all valid snippets of the
  batch, so videos weigh by length inside a batch (MMSD averages per video); the mean is
  multiplied by the batch size so that its scale matches the per-video sum;
- self-voting pseudo labels: masked MSE between each stream's attention and the average of
  the stored pseudo labels of the streams it trusts at each snippet (see ``voting_loss``).
"""

import torch

import mmsd_ext

# MMSD's defaults (train_options.py of LeonHLJ/MMSD).
CLS_WEIGHT = 1.0
ATT_WEIGHT = 0.1
DISTILL_WEIGHT = 0.1
VOTING_WEIGHT = 2.0
ATT_BRANCH_WEIGHT = 1.0  # lambda-caa
MIL_BRANCH_WEIGHT = 0.5  # lambda-csa
MIL_RATIO = 8.0  # k = max(1, floor(L / 8))
TEMPERATURE = 0.2
CONFIDENT = 0.6  # con_hyp: a stream trusts its own label where its confidence reaches this
MARGIN = 0.3  # int_hyp: ... and another's where that one is this much more confident
PSEUDO_THRESHOLD = 0.55  # theta: attention above it labels a snippet foreground


def normalized_ce(logits, targets):
    """MMSD's NormalizedCrossEntropy per video: ``-sum_c (t_c / sum t) log softmax(logits)_c``.

    logits [..., B, K], targets [B, K]; returns [..., B]. log_softmax instead of log(softmax)
    keeps it finite where a probability underflows.
    """
    weights = targets / (targets.sum(-1, keepdim=True) + 1e-8)
    return -(weights * torch.log_softmax(logits, dim=-1)).sum(-1)


def attention_loss(cas_logits, labels, lengths, mask, *, backend=None):
    """MMSD's FrmScrLoss on ``sigmoid(cas_logits)`` per stream and video: [S, B]."""
    S, B, T, K = cas_logits.shape
    C = K - 1
    y = torch.cat([labels, labels.new_ones(B, 1)], dim=-1)  # [B, C+1]
    a = torch.sigmoid(cas_logits)
    flat = a.reshape(S * B, T, K)
    k = mmsd_ext.mil_k(lengths, MIL_RATIO).repeat(S)
    flat_lengths = lengths.repeat(S)
    top = mmsd_ext.topk_mil_pool(flat, k, flat_lengths, backend=backend)
    bottom = mmsd_ext.topk_mil_pool(flat, k, flat_lengths, largest=False, backend=backend)
    contrast = ((bottom - top) * y.repeat(S, 1)).sum(-1).reshape(S, B)

    masked = a * y[None, :, None, :]
    gap = (masked[..., :C].amax(-1) - masked[..., C]).abs() * mask.to(a.dtype)
    separation = -gap.sum(-1) / lengths.to(a.dtype)
    return contrast + separation


def distill_loss(cas_logits, streams, mask, *, temperature=TEMPERATURE, backend=None):
    """MMSD's multi-modality distillation (mean over valid snippets) for the streams present."""
    streams = tuple(streams)  # a list names the same streams
    if streams == ("rgb", "flow", "fused"):
        return mmsd_ext.mmsd_distill_loss(cas_logits[0], cas_logits[1], cas_logits[2], temperature, mask=mask, backend=backend)
    if streams == ("rgb", "flow"):
        rgb, flow = cas_logits[0], cas_logits[1]
        return mmsd_ext.snippet_distill_loss(rgb, flow, temperature, mask=mask, backend=backend) + mmsd_ext.snippet_distill_loss(
            flow, rgb, temperature, mask=mask, backend=backend
        )
    raise ValueError(f"distillation needs the rgb and flow streams, got {streams}")


def confidence(cas_logits, labels):
    """MMSD's snippet confidence per stream: ``|sum_action p - p_background|`` with p =
    softmax(cas_logits) masked to the video's classes and background. [S, B, T], no gradient."""
    B = labels.shape[0]
    y = torch.cat([labels, labels.new_ones(B, 1)], dim=-1)
    p = torch.softmax(cas_logits.detach(), dim=-1) * y[None, :, None, :]
    return (p[..., :-1].sum(-1) - p[..., -1]).abs()


def voting_targets(conf, stored_labels, mask, *, confident=CONFIDENT, margin=MARGIN):
    """Multi-modality self-voting: per stream x, the average stored label of the trusted streams.

    Stream x trusts itself where ``conf_x >= confident``, and another stream y where
    ``conf_y >= confident`` and ``conf_y - conf_x >= margin``. Returns (targets, use), both
    [S, B, T]; ``use`` marks snippets where at least one stream is trusted (valid ones only).
    The ``+ 1e-4`` in the denominator is MMSD's.
    """
    S = conf.shape[0]
    sure = conf >= confident  # [S, B, T]
    trust = ((conf[None] - conf[:, None]) >= margin) & sure[None]  # [x, y, B, T]
    eye = torch.eye(S, dtype=torch.bool, device=conf.device)[:, :, None, None]
    trust = torch.where(eye, sure[None].expand_as(trust), trust)
    trustf = trust.to(stored_labels.dtype)
    count = trustf.sum(1)
    targets = (trustf * stored_labels[None]).sum(1) / (count + 1e-4)
    use = (count > 0) & mask[None]
    return targets, use


def voting_loss(attention, cas_logits, labels, stored_labels, mask):
    """Masked MSE of each stream's attention against its voted target, mean per video: [S, B]."""
    targets, use = voting_targets(confidence(cas_logits, labels), stored_labels, mask)
    usef = use.to(attention.dtype)
    sq = (attention - targets) ** 2 * usef
    return sq.sum(-1) / usef.sum(-1).clamp_min(1)


def mmsd_loss(outputs, labels, lengths, streams, *, stored_labels=None, distill=True, distill_scale=None, backend=None, weights=None):
    """MMSD's total loss for one batch, summed over its videos, and its parts (detached).

    outputs: ``MMSD.forward``'s dict. labels [B, C]. stored_labels: [S, B, T] pseudo labels
    for the voting term, or None to leave it out (before the first refresh, or ablated).
    distill_scale: factor on the distillation mean (default B). A process that holds part of
    a step's videos passes ``B_step * N_here / N_step`` (N: valid snippets), so that the sum
    over processes equals the whole step's ``B_step * mean``.
    """
    w = {"cls": CLS_WEIGHT, "att": ATT_WEIGHT, "distill": DISTILL_WEIGHT, "voting": VOTING_WEIGHT}
    w.update(weights or {})
    B = labels.shape[0]
    mask = outputs["mask"]
    zeros = labels.new_zeros(B, 1)
    ones = labels.new_ones(B, 1)
    cls = ATT_BRANCH_WEIGHT * normalized_ce(
        outputs["video_logits"], torch.cat([labels, zeros], -1)
    ) + MIL_BRANCH_WEIGHT * normalized_ce(outputs["mil_logits"], torch.cat([labels, ones], -1))
    parts = {
        "cls": cls.sum(),
        "att": attention_loss(outputs["cas_logits"], labels, lengths, mask, backend=backend).sum(),
    }
    if distill and len(streams) > 1:
        scale = B if distill_scale is None else distill_scale
        parts["distill"] = distill_loss(outputs["cas_logits"], streams, mask, backend=backend) * scale
    if stored_labels is not None:
        parts["voting"] = voting_loss(outputs["attention"], outputs["cas_logits"], labels, stored_labels, mask).sum()
    total = sum(w[name] * value for name, value in parts.items())
    return total, {name: value.detach() for name, value in parts.items()}


@torch.no_grad()
def refresh_pseudo_labels(outputs, labels, stored_labels, stored_conf, *, threshold=PSEUDO_THRESHOLD):
    """MMSD's pseudo-label update for a batch: label = attention > threshold, replacing the
    stored label (and confidence) only where the new confidence beats the stored one.

    stored_labels, stored_conf: [S, B, T]; returns the updated pair (new tensors).
    """
    conf = confidence(outputs["cas_logits"], labels)
    fresh = (outputs["attention"] > threshold).to(stored_labels.dtype)
    better = (conf > stored_conf) & outputs["mask"][None]
    return torch.where(better, fresh, stored_labels), torch.where(better, conf, stored_conf)
