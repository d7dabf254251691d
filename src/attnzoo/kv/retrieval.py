"""Read-sparse presses: the whole cache stays in memory; at each decoding step every query reads only
the entries it selects. `ratio` is the fraction of entries left unread (the measured read fraction is
reported); the bytes held are those of the full cache."""
from __future__ import annotations

import math

import torch

from ..core.info import Paper, Param, nonneg_int, positive_int
from ..variants.sparse import quest, tokenselect
from . import profile
from .base import KVPress, Step, keep_count, register, topk_mask


class ReadPress(KVPress):
    kind = "read"
    stages = ("decode",)

    def readable(self, step: Step) -> torch.Tensor:
        """(B, Hkv) entries each head may read this step."""
        return keep_count(step.valid.sum(-1), self.ratio)

    def forced(self, step: Step) -> torch.Tensor:
        """(B, Hkv, Sq, S) bool: slots every query reads: this forward's own tokens (causality does the rest)."""
        return step.new.unsqueeze(2).expand(-1, -1, step.query.shape[2], -1)


def sparse_share(ratio: float, n_layers: int, dense: int) -> float:
    """Fraction the sparse layers may read so that, with `dense` layers reading everything, all layers
    together read 1 - ratio (negative when the dense layers alone exceed that)."""
    return ((1 - ratio) * n_layers - dense) / (n_layers - dense)


@register
class QuestPress(ReadPress):
    name = "quest"
    paper = quest.PAPER
    summary = ("Pages of `page` consecutive entries keep their per-channel min and max key; each query head "
               "reads the pages with the highest upper bound of q.k (sum over channels of max(q*min, q*max)) "
               "and the page holding the current token. No eviction. The first `dense_layers` layers read "
               "everything, as in the paper; the other layers read fewer pages so that the average over all "
               "layers still leaves `ratio` unread.")
    params = KVPress.params + (positive_int("page", 16, "entries per page"),
                               nonneg_int("dense_layers", 2, "first layers left dense"))

    def readable(self, step: Step) -> torch.Tensor:
        dense = min(self.dense_layers, step.n_layers)
        if dense == step.n_layers:
            return step.valid.sum(-1)
        share = max(0.0, sparse_share(self.ratio, step.n_layers, dense))
        return (step.valid.sum(-1) * share).round().long().clamp(min=1)

    def read(self, step):
        if step.prefill or step.layer < self.dense_layers:
            return None
        b, hkv, s, d = step.keys.shape
        n_pages = -(-s // self.page)
        pad = n_pages * self.page - s
        # The same page bounds as the `quest` attention variant, over the slots that hold entries.
        kmin, kmax, live = quest.page_bounds(step.keys.float(), self.page, step.valid)
        sq = step.query.shape[2]
        q = step.query.float().view(b, hkv, step.groups, sq, d)
        upper = quest.upper_bound(q, kmin.unsqueeze(2), kmax.unsqueeze(2))  # (B, Hkv, g, Sq, P)
        newest = torch.nn.functional.pad(step.new, (0, pad)).view(b, hkv, n_pages, self.page).any(-1)
        upper = upper.masked_fill(~live[:, :, None, None], -math.inf).masked_fill(newest[:, :, None, None], math.inf)
        pages = -(-self.readable(step) // self.page)  # (B, Hkv)
        chosen = topk_mask(upper, pages)  # (B, Hkv, g, Sq, P)
        slots = chosen.repeat_interleave(self.page, dim=-1)[..., :s]
        return slots.reshape(b, hkv * step.groups, sq, s)


@register
class TokenSelectPress(ReadPress):
    name = "token_select"
    paper = tokenselect.PAPER
    summary = ("Token-level selection per decoding step: each head's softmax of q.k over the cache votes, the "
               "votes are summed over the heads of the layer, and every head reads the top-voted entries. "
               "No eviction.")

    def read(self, step):
        if step.prefill:
            return None
        # The `tokenselect` variant's soft vote, over every head of the layer: (B, 1, Sq, S).
        probs = step.attention()
        votes = tokenselect.soft_votes(probs, probs.shape[1])
        votes = votes.expand(-1, step.keys.shape[1], -1, -1)
        votes = votes.masked_fill(self.forced(step), math.inf).masked_fill(~step.valid.unsqueeze(2), -math.inf)
        return topk_mask(votes, self.readable(step))


def rotary_module(model):
    """The model's rotary-embedding module (forward(x, position_ids) -> (cos, sin)), or a clear error."""
    for m in model.modules():
        if type(m).__name__.endswith("RotaryEmbedding"):
            if float(getattr(m, "attention_scaling", 1.0)) != 1.0:
                raise ValueError(f"{type(m).__name__} scales its rotations (attention_scaling != 1); a2ats needs "
                                 "plain RoPE")
            return m
    raise ValueError(f"{type(model).__name__} has no rotary-embedding module; a2ats needs a RoPE model")


def rotate(rotary, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """RoPE (rotate-half convention) of x (B, H, S, D) by `positions` (B, S); negative positions undo it."""
    cos, sin = rotary(x, positions)
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


@register
class A2ATSPress(ReadPress):
    name = "a2ats"
    paper = Paper("A^2ATS: Retrieval-Based KV Cache Reduction via Windowed Rotary Position Embedding and "
                  "Query-Aware Vector Quantization", 2025, "2502.12665")
    summary = ("Windowed RoPE: keys are un-rotated and queries rotated by the window length, so q.k estimates "
               "attention as if every remote key sat `window` tokens back. Keys are vector-quantized per head "
               "with k-means in the metric of the prompt queries' second moment (query-aware VQ: it minimises "
               "the error of q.k, not of k). Each decoding query reads the `window` most recent entries plus "
               "the top entries by q.centroid. No eviction (the paper offloads the full cache to the host).")
    params = KVPress.params + (
        positive_int("window", 32, "recent entries always read (and the windowed-RoPE distance)"),
        Param("codes", 64, "centroids per head", (int,), lambda v: v >= 2, "an int >= 2"),
        positive_int("iterations", 8, "k-means iterations"),
    )

    def __init__(self, ratio: float = 0.0, **params):
        super().__init__(ratio, **params)
        self.rotary = None

    def prepare(self, model, tokenizer):
        self.rotary = rotary_module(model)

    def keep(self, step):
        if step.prefill:
            self._build_codebook(step)
        return None

    def _build_codebook(self, step):
        b, hkv, s, d = step.keys.shape
        pos = step.query_position[:, -s:]  # slot positions: the prompt's tokens
        raw = self._unrotate(step.keys.float(), pos)  # (B, Hkv, S, D)
        q = rotate(self.rotary, step.query.float(), self.window - step.query_position)
        q = q * step.query_valid.view(b, 1, -1, 1)
        q = q.reshape(b, hkv, step.groups * q.shape[2], d)
        second = q.transpose(-1, -2) @ q / step.query_valid.sum(1).clamp(min=1).view(-1, 1, 1, 1) / step.groups
        eigval, eigvec = torch.linalg.eigh(second)
        transform = eigvec * eigval.clamp(min=1e-6 * eigval.amax(-1, keepdim=True)).sqrt().unsqueeze(-2)
        z = raw @ transform  # k-means here minimises E_q[(q.k - q.c)^2]
        valid = step.valid
        n_codes = min(self.codes, s)
        start = torch.linspace(0, s - 1, n_codes).long()
        centroids = z[:, :, start]
        for _ in range(self.iterations):
            code = torch.cdist(z, centroids).argmin(-1)  # (B, Hkv, S)
            onehot = torch.nn.functional.one_hot(code, n_codes).float() * valid.unsqueeze(-1)
            counts = onehot.sum(2).unsqueeze(-1)  # (B, Hkv, C, 1)
            centroids = torch.where(counts > 0, onehot.transpose(-1, -2) @ z / counts.clamp(min=1), centroids)
        code = torch.cdist(z, centroids).argmin(-1)
        step.extra["a2ats"] = code.double()
        inverse = torch.linalg.pinv(transform)
        step.session.shared[("a2ats", step.layer)] = (transform, centroids, centroids @ inverse)

    def _unrotate(self, keys, positions):
        return rotate(self.rotary, keys, -positions)

    def read(self, step):
        if step.prefill:
            return None
        transform, centroids_z, centroids = step.session.shared[("a2ats", step.layer)]
        b, hkv, s, d = step.keys.shape
        new = step.new
        if bool(new.any()):  # code the entries this forward added (the last slots: nothing is evicted)
            n_new = int(new[0, 0].sum())
            z_new = self._unrotate(step.keys[:, :, -n_new:].float(), step.query_position[:, -n_new:]) @ transform
            step.extra["a2ats"][..., -n_new:] = torch.cdist(z_new, centroids_z).argmin(-1).double()
        sq = step.query.shape[2]
        q = rotate(self.rotary, step.query.float(), self.window - step.query_position)
        approx = q.reshape(b, hkv, step.groups * sq, d) @ centroids.transpose(-1, -2)  # (B, Hkv, g*Sq, C)
        code = step.extra["a2ats"].long().unsqueeze(2).expand(-1, -1, approx.shape[2], -1)
        scores = approx.gather(-1, code).view(b, hkv, step.groups, sq, s)
        recent = step.index.unsqueeze(2) > step.query_index.view(1, 1, -1, 1) - self.window  # (B, Hkv, Sq, S)
        scores = scores.masked_fill(recent.unsqueeze(2), math.inf)
        scores = scores.masked_fill(~step.valid[:, :, None, None], -math.inf)
        return topk_mask(scores, self.readable(step)).view(b, hkv * step.groups, sq, s)


@register
class HyLRAPress(ReadPress):
    name = "hylra"
    paper = Paper("HyLRA: Hybrid Layer Reuse Attention for Efficient Long-Context Inference", 2025)
    summary = ("Layer policy from offline profiling on real text: sensitive layers attend densely and pass "
               "their top-k entries (by the current query's attention) to the following tolerant layers, "
               "which read only those (no scoring of their own). A dynamic programme over layers picks the "
               "dense layers that maximise the attention mass the reused sets capture, with k set so that "
               "the average entries read match the ratio. No eviction.")

    def __init__(self, ratio: float = 0.0, **params):
        super().__init__(ratio, **params)
        self.probe: list[torch.Tensor] | None = None
        self._policies: dict[float, tuple[list[bool], float, bool]] = {}

    def prepare(self, model, tokenizer):
        self.probe = profile.decode_attention(model, tokenizer)
        self.groups = model.config.num_attention_heads // model.config.num_key_value_heads

    def policy(self) -> tuple[list[bool], float, bool]:
        """(selecting layers, fraction of entries a reusing layer reads, whether selecting layers read all)."""
        if self.ratio not in self._policies:
            self._policies[self.ratio] = plan_layer_reuse(self.probe, self.ratio, self.groups)
        return self._policies[self.ratio]

    def read(self, step):
        if step.prefill:
            return None
        selecting, share, dense = self.policy()
        if selecting[step.layer]:
            # The top-k of this layer's own attention, handed to the layers that reuse it.
            votes = step.group_mean(step.attention()).masked_fill(self.forced(step), math.inf)
            votes = votes.masked_fill(~step.valid.unsqueeze(2), -math.inf)
            count = (step.valid.sum(-1).double() * share).round().long().clamp(min=1)
            step.session.shared["hylra"] = topk_mask(votes, count)
            if dense:
                return None
        chosen = step.session.shared["hylra"] | self.forced(step)
        return chosen & step.valid.unsqueeze(2)


def plan_layer_reuse(probe: list[torch.Tensor], ratio: float, groups: int) -> tuple[list[bool], float, bool]:
    """HyLRA's offline policy on profiled attention `probe` (per layer (Hq, Q, S)): for each count of
    dense layers that the ratio allows, the dynamic programme over (layer, last dense layer) that
    maximises the mass the reused top-k sets capture; the best count wins. When the ratio leaves no
    room for even one dense layer, layer 0 selects (reading only its own top-k) and all others reuse."""
    n = len(probe)
    seq = probe[0].shape[-1]
    kv = [p.view(-1, groups, *p.shape[1:]).mean(1).mean(1) for p in probe]  # per layer (Hkv, S) mean attention
    best = (None, -math.inf, 1.0)
    for n_dense in range(1, n):  # all layers dense would read everything
        share = sparse_share(ratio, n, n_dense)
        if share < 0:
            break
        k = max(1, round(share * seq))
        sets = [topk_mask(v, torch.tensor(k)) for v in kv]  # (Hkv, S) per layer
        mass = torch.tensor([[float((kv[l] * sets[a]).sum(-1).mean()) if a < l else 0.0 for a in range(n)]
                             for l in range(n)])
        # value[a][c]: best captured mass so far with last dense layer a and c dense layers
        value = {(0, 1): 1.0}
        back = {}
        for layer in range(1, n):
            nxt = {}
            for (a, c), v in value.items():
                for state, gain in (((layer, c + 1), 1.0), ((a, c), float(mass[layer, a]))):
                    if state[1] <= n_dense and v + gain > nxt.get(state, -math.inf):
                        nxt[state] = v + gain
                        back[(layer, state)] = (a, c)
            value = nxt
        finals = {s: v for s, v in value.items() if s[1] == n_dense}
        if not finals:
            continue
        state, total = max(finals.items(), key=lambda t: t[1])
        if total > best[1]:
            dense = [False] * n
            dense[0] = True
            for layer in range(n - 1, 0, -1):
                dense[layer] = state[0] == layer
                state = back[(layer, state)]
            best = (dense, total, share)
    if best[0] is None:
        return [True] + [False] * (n - 1), 1 - ratio, False
    return best[0], best[2], True
