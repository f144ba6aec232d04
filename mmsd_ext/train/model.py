"""The MMSD model (Huang, Wang, Li, TIP 2022) on padded batches.

Per video x: [T, 2 * M] (RGB half, flow half):

- RGB embedding: Linear(M, M) + ReLU + Dropout -> r_mid; Linear(M, E) + ReLU + Dropout -> r_emb;
  flow likewise -> f_mid, f_emb; fused: Linear(2M, E) + ReLU + Dropout on [r_mid, f_mid] -> p_emb.
- Three streams (rgb, flow, fused), same structure, separate weights, each with C + 1 class
  centres (C actions + background, Xavier init) and a foreground centre (minus the
  background centre at init). With cos() the cosine similarity and s the scale (20):
  ``cas_logits[t, c] = s cos(emb_t, centre_c)``, ``att[t] = sigmoid(s cos(emb_t, fg))``;
  attention branch: ``v = sum_t emb_t att_t / sum_t att_t``, logits ``s cos(v, centre_c)``;
  MIL branch: ``v_c = sum_t emb_t w_tc / sum_t w_tc`` with ``w = sigmoid(cas_logits)``,
  logits ``s cos(v_c, centre_c)``.

The three streams are held as stacked parameters and run as one batched computation; every
output carries a leading stream axis. Padding (t >= lengths[b]) is excluded from every pooling,
and the embedding layers run only on the valid snippets (packed), so padding costs nothing
in the heavy part. Ablations: ``streams`` is a subset of ("rgb", "flow", "fused").
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

STREAMS = ("rgb", "flow", "fused")
# MMSD's inference fusion of the streams (rgb, flow, fused).
FUSION_WEIGHTS = {"rgb": 0.2, "flow": 0.4, "fused": 0.4}


class MMSD(nn.Module):
    """MMSD over padded batches.

    Args:
        num_classes: C (actions; the background class is added).
        modality_dim: M, the size of each modality's half of the features (I3D: 1024).
        embed_dim: E (MMSD: 1024).
        dropout: MMSD: 0.6.
        scale: cosine scale s (MMSD: 20).
        streams: which streams to build, in STREAMS order.
    """

    def __init__(self, num_classes, modality_dim=1024, embed_dim=1024, dropout=0.6, scale=20.0, streams=STREAMS):
        super().__init__()
        if isinstance(streams, (str, bytes)):
            raise TypeError(f"streams: expected a sequence of stream names, got {type(streams).__name__} {streams!r}")
        unknown = [s for s in streams if s not in STREAMS]
        if unknown or not streams:
            raise ValueError(f"streams: expected a non-empty subset of {STREAMS}, got {tuple(streams)!r}")
        streams = tuple(s for s in STREAMS if s in streams)
        self.num_classes = num_classes
        self.modality_dim = modality_dim
        self.embed_dim = embed_dim
        self.scale = float(scale)
        self.streams = streams

        def block(n_in, n_out):
            return nn.Sequential(nn.Linear(n_in, n_out), nn.ReLU(), nn.Dropout(dropout))

        # The mid layers feed the fused embedding, so they exist whatever the streams.
        self.rgb_mid = block(modality_dim, modality_dim)
        self.flow_mid = block(modality_dim, modality_dim)
        self.rgb_out = block(modality_dim, embed_dim) if "rgb" in streams else None
        self.flow_out = block(modality_dim, embed_dim) if "flow" in streams else None
        self.fused_out = block(2 * modality_dim, embed_dim) if "fused" in streams else None
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        S = len(streams)
        centres = torch.empty(S, num_classes + 1, embed_dim)
        for s in range(S):
            nn.init.xavier_uniform_(centres[s])
        self.centres = nn.Parameter(centres)
        # The foreground centre starts opposite the background centre.
        self.fg_centres = nn.Parameter(-centres[:, -1:, :].clone())

    def forward(self, features, lengths):
        """features: [B, T, 2M] float, lengths: [B] int64 (valid snippets t < lengths[b]).

        Returns a dict (S = number of streams):
          ``cas_logits`` [S, B, T, C+1], ``attention`` [S, B, T] (sigmoid, zero at padding),
          ``video_logits`` [S, B, C+1] (attention branch), ``mil_logits`` [S, B, C+1],
          ``mask`` [B, T] bool, ``norm_overflow`` 0-d bool (an embedding's norm overflowed
          the dtype: its cosines are 0).
        """
        B, T, D = features.shape
        if D != 2 * self.modality_dim:
            raise ValueError(f"features: expected {2 * self.modality_dim} channels (RGB + flow), got {D}")
        mask = torch.arange(T, device=features.device)[None, :] < lengths[:, None]
        packed = features[mask]  # [N, 2M], valid snippets only
        r_mid = self.rgb_mid(packed[:, : self.modality_dim])
        f_mid = self.flow_mid(packed[:, self.modality_dim :])
        embeds = []
        for name in self.streams:
            if name == "rgb":
                embeds.append(self.rgb_out(r_mid))
            elif name == "flow":
                embeds.append(self.flow_out(f_mid))
            else:
                embeds.append(self.fused_out(torch.cat([r_mid, f_mid], dim=-1)))
        packed_emb = torch.stack(embeds)  # [S, N, E]
        S = packed_emb.shape[0]
        emb = packed_emb.new_zeros(S, B, T, self.embed_dim)
        emb[:, mask] = packed_emb
        return self.heads(emb, mask)

    def heads(self, emb, mask):
        """The stacked streams' classifiers on padded embeddings emb: [S, B, T, E]."""
        s = self.scale
        maskf = mask.to(emb.dtype)
        # 1e-12 (F.normalize's default) is 0 in float16, where a padded embedding's 0 / 0 made
        # NaN that the masks' products kept (NaN * 0): its smallest normal number there.
        eps = max(1e-12, torch.finfo(emb.dtype).tiny)
        # F.normalize written out (the same bits), to see its norm: an embedding whose norm passes
        # about 1.8e19 (features far beyond any real ones) overflows float32's squared sum, and its
        # unit vector is 0, which scores every snippet alike (the trainer stops with an error then).
        norms = torch.linalg.vector_norm(emb, dim=-1, keepdim=True)
        unit_emb = emb / norms.clamp_min(eps)
        unit_centres = F.normalize(self.centres, dim=-1)  # [S, C+1, E]
        unit_fg = F.normalize(self.fg_centres, dim=-1)  # [S, 1, E]
        cas_logits = s * torch.einsum("sbte,sce->sbtc", unit_emb, unit_centres)
        attention = torch.sigmoid(s * torch.einsum("sbte,se->sbt", unit_emb, unit_fg[:, 0])) * maskf

        # Attention branch: attention-weighted mean of the (unnormalised) embeddings.
        pooled = torch.einsum("sbt,sbte->sbe", attention, emb) / attention.sum(-1, keepdim=True).clamp_min(eps)
        video_logits = s * torch.einsum("sbe,sce->sbc", F.normalize(pooled, dim=-1, eps=eps), unit_centres)

        # MIL branch: one class-weighted mean per class, scored against that class's centre.
        weights = torch.sigmoid(cas_logits) * maskf[None, :, :, None]
        class_pooled = torch.einsum("sbtc,sbte->sbce", weights, emb) / weights.sum(2)[..., None].clamp_min(eps)
        mil_logits = s * (F.normalize(class_pooled, dim=-1, eps=eps) * unit_centres[:, None]).sum(-1)
        return {
            "cas_logits": cas_logits,
            "attention": attention,
            "video_logits": video_logits,
            "mil_logits": mil_logits,
            "mask": mask,
            "norm_overflow": torch.isinf(norms).any(),
        }

    def fusion_weights(self):
        """MMSD's 0.2 / 0.4 / 0.4 over the streams present, renormalised to sum 1."""
        w = torch.tensor([FUSION_WEIGHTS[name] for name in self.streams])
        return w / w.sum()


@torch.no_grad()
def fuse(outputs, weights):
    """MMSD's inference: fused attention, video scores and CAS from the streams' outputs.

    Returns (cas [B, T, C], video_scores [B, C]) for the C action classes:
    ``att = sum_s w_s att_s``, ``scores = sum_s w_s softmax(video_logits_s)``,
    ``cas = (sum_s w_s softmax(cas_logits_s)) * att`` (zero at padding).
    """
    w = weights.to(outputs["attention"].device, outputs["attention"].dtype)
    att = torch.einsum("s,sbt->bt", w, outputs["attention"])
    scores = torch.einsum("s,sbc->bc", w, torch.softmax(outputs["video_logits"], dim=-1))
    probs = torch.einsum("s,sbtc->btc", w, torch.softmax(outputs["cas_logits"], dim=-1))
    cas = probs * att[..., None]
    C = cas.shape[-1] - 1
    return cas[..., :C], scores[..., :C]
