"""Routing Transformer: content-based sparse attention by online k-means.

Queries and keys are put on the unit sphere and routed to their nearest of `clusters` centroids
(per query head; a GQA group's heads route the keys of their kv head apart). Each cluster takes the
`top_k` keys nearest to its centroid (the balanced clusters of the paper's implementation, w = n / c
keys each); a query reads the keys of its nearest centroid's cluster, and its own position (so no
causal row is empty; in the paper local-attention heads sit beside the routing heads), with exact
softmax over them. Causality applies on top.

Centroids are state: the input `centroids` (H, clusters, D), kept across calls and moved by
`update_centroids` (the paper's exponential moving average of the queries and keys routed to each
centroid). Without it, centroids are found per (batch row, head) by `kmeans_steps` rounds of
spherical k-means on the call's own queries and keys, started from evenly spaced keys.
"""
from __future__ import annotations

import torch

from ...core.info import Input, Paper, Param, positive_int
from ...core.registry import register
from ...core.selection import Selection, SelectionVariant

PAPER = Paper("Efficient Content-Based Sparse Attention with Routing Transformers", 2020, "2003.05997")


def unit(x: torch.Tensor) -> torch.Tensor:
    """Rows of x on the unit sphere (zero rows stay zero)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def spherical_kmeans(points: torch.Tensor, init: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` rounds of k-means on the unit sphere: points (..., N, D) unit rows, init (..., C, D) ->
    centroids (..., C, D); each round assigns every point to its most similar centroid and moves each
    centroid to the normalised mean of its points (a centroid with no points stays)."""
    centroids = init
    for _ in range(steps):
        nearest = (points @ centroids.transpose(-1, -2)).argmax(-1)                     # (..., N)
        onehot = torch.nn.functional.one_hot(nearest, centroids.shape[-2]).to(points.dtype)
        sums = onehot.transpose(-1, -2) @ points                                       # (..., C, D)
        counts = onehot.sum(-2).unsqueeze(-1)
        centroids = torch.where(counts > 0, unit(sums), centroids)
    return centroids


@register
class Routing(SelectionVariant):
    name = "routing"
    summary = ("Routing Transformer: unit-normalised queries and keys routed to the nearest of `clusters` "
               "centroids (per query head); each cluster keeps its top_k keys nearest to the centroid; a query "
               "reads its cluster's keys and its own position with exact softmax. Centroids: the input "
               "`centroids` (H, clusters, D), moved between calls by update_centroids (online k-means, EMA), "
               "or, when absent, kmeans_steps rounds of spherical k-means on the call's q and k.")
    paper = PAPER
    params = (
        positive_int("clusters", 8, "centroids per head (the paper uses about sqrt(S))"),
        positive_int("top_k", 64, "keys each cluster keeps, nearest to its centroid (the paper's window n / clusters)"),
        Param("kmeans_steps", 3, "rounds of spherical k-means on the call's q and k when no centroids are given",
              (int,), lambda v: v >= 0, "a non-negative int"),
    )
    inputs = (Input("centroids", "(H, clusters, D)", "routing centroids per query head (the online k-means "
                                                     "state); absent: k-means on this call's q and k",
                    required=False),)
    cost = "route: O((Sq + Sk) clusters D) (+ kmeans_steps x that without centroids); attend: O(Sq top_k D)"
    budget_param = "top_k"

    def centroids(self, q, k, call) -> torch.Tensor:
        """(B or 1, Hq, clusters, D) unit centroids: the input, or k-means on this call's unit q and k."""
        given = call.inputs.get("centroids")
        acc = torch.promote_types(q.dtype, torch.float32)
        if given is not None:
            return unit(given.to(acc)).unsqueeze(0)
        s = call.shapes
        uk = unit(k.to(acc)).repeat_interleave(s.group, dim=1)                          # (B, Hq, Sk, D)
        start = torch.linspace(0, s.sk - 1, self.config["clusters"], device=q.device).round().long()
        points = torch.cat([unit(q.to(acc)), uk], dim=2)
        return spherical_kmeans(points, uk[:, :, start], self.config["kmeans_steps"])

    def select(self, q, k, call) -> Selection:
        s = call.shapes
        acc = torch.promote_types(q.dtype, torch.float32)
        mu = self.centroids(q, k, call)
        uk = unit(k.to(acc)).unsqueeze(2)                                               # (B, Hkv, 1, Sk, D)
        mu_g = mu.view(mu.shape[0], s.kv_heads, s.group, *mu.shape[2:])
        key_sim = (mu_g @ uk.transpose(-1, -2)).view(s.batch, s.q_heads, mu.shape[2], s.sk)   # (B, Hq, C, Sk)
        members = key_sim.topk(min(self.config["top_k"], s.sk), dim=-1).indices               # (B, Hq, C, w)
        cluster = (unit(q.to(acc)) @ mu.transpose(-1, -2)).argmax(-1)                           # (B, Hq, Sq)
        keys = members.gather(2, cluster.unsqueeze(-1).expand(-1, -1, -1, members.shape[-1]))  # (B, Hq, Sq, w)
        own = s.query_positions(device=q.device).view(1, 1, -1, 1).expand(s.batch, s.q_heads, -1, 1)
        keys = keys.masked_fill(keys == own, -1)                                                # own once
        return Selection(torch.cat([own, keys], dim=-1), 1, s.sk)

    def update_centroids(self, centroids: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                         decay: float = 0.999) -> torch.Tensor:
        """The paper's online k-means step: mu <- decay mu + (1 - decay) / 2 (mean of the unit queries routed to
        mu + mean of the unit keys routed to mu), averaged over the batch, then back on the unit sphere; a
        centroid nothing was routed to stays. centroids (H, C, D), q (B, H, Sq, D), k (B, Hkv, Sk, D)."""
        if not isinstance(decay, float) or not 0.0 <= decay < 1.0:
            raise ValueError(f"routing: decay must be a float in [0, 1), got {decay!r}")
        h, c, d = centroids.shape
        if q.dim() != 4 or q.shape[1] != h or q.shape[3] != d or k.dim() != 4 or h % k.shape[1] or k.shape[3] != d:
            raise ValueError(f"routing: update_centroids needs centroids (H, C, D) = {tuple(centroids.shape)}, q "
                             f"(B, H, Sq, D) and k (B, Hkv, Sk, D) with Hkv dividing H; got q {tuple(q.shape)}, "
                             f"k {tuple(k.shape)}")
        mu = unit(centroids)
        moved = []
        for x in (unit(q), unit(k).repeat_interleave(h // k.shape[1], dim=1)):
            onehot = torch.nn.functional.one_hot((x @ mu.transpose(-1, -2)).argmax(-1), c).to(x.dtype)
            sums, counts = (onehot.transpose(-1, -2) @ x).sum(0), onehot.sum((0, 2)).unsqueeze(-1)   # (H, C, D)
            moved.append(torch.where(counts > 0, sums / counts.clamp_min(1), mu))
        return unit(decay * mu + (1 - decay) / 2 * (moved[0] + moved[1]))
