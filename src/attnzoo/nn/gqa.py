"""Shared key/value heads: multi-query attention (one KV head), grouped-query attention (kv_heads
groups), and GQA's conversion of a multi-head checkpoint by mean-pooling its K/V heads."""
from __future__ import annotations

from typing import ClassVar

import torch

from ..core.info import Paper
from .common import check_int
from .mha import MultiheadAttention

MQA_PAPER = Paper("Fast Transformer Decoding: One Write-Head is All You Need", 2019, "1911.02150")
GQA_PAPER = Paper("GQA: Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints", 2023,
                  "2305.13245")


class MultiQueryAttention(MultiheadAttention):
    """Multi-query attention: every query head reads one shared key/value head (Shazeer, 2019).
    The KV cache is `heads` times smaller than multi-head attention's."""

    paper: ClassVar[Paper] = MQA_PAPER

    def __init__(self, dim: int, heads: int, head_dim: int | None = None, variant: str = "full", rope: bool = True,
                 rope_base: float = 10000.0, bias: bool = False, **params):
        if "kv_heads" in params and params["kv_heads"] != 1:
            raise ValueError(f"MultiQueryAttention: kv_heads is 1 by definition, got kv_heads={params['kv_heads']!r} "
                             "(use GroupedQueryAttention)")
        params.pop("kv_heads", None)
        super().__init__(dim, heads, 1, head_dim, variant, rope, rope_base, bias, **params)

    @property
    def config(self) -> dict:
        c = super().config
        del c["kv_heads"]
        return c


class GroupedQueryAttention(MultiheadAttention):
    """Grouped-query attention: `kv_heads` key/value heads, each shared by a group of `heads // kv_heads`
    query heads (query head h reads KV head h // (heads // kv_heads)); kv_heads = 1 is MQA, kv_heads =
    heads is MHA (Ainslie et al., 2023)."""

    paper: ClassVar[Paper] = GQA_PAPER

    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int | None = None, variant: str = "full",
                 rope: bool = True, rope_base: float = 10000.0, bias: bool = False, **params):
        check_int(type(self).__name__, "kv_heads", kv_heads)
        super().__init__(dim, heads, kv_heads, head_dim, variant, rope, rope_base, bias, **params)


def _pool_rows(weight: torch.Tensor, old: int, new: int) -> torch.Tensor:
    """Rows grouped per KV head (old * n, ...) -> mean over each run of old // new consecutive heads."""
    rest = weight.shape[1:]
    per = weight.shape[0] // old
    return weight.reshape(new, old // new, per, *rest).mean(dim=1).reshape(new * per, *rest)


@torch.no_grad()
def gqa_from_mha(module: MultiheadAttention, kv_heads: int) -> MultiheadAttention:
    """A grouped-query copy of `module` with `kv_heads` KV heads: each new key and value head's
    projection is the mean of the projections of the heads it replaces (the GQA paper's
    conversion of a multi-head checkpoint, to be uptrained). Query and output projections are
    copied. `module` may already share KV heads; `kv_heads` must divide its `kv_heads`. Learned
    per-KV-head gates (GLA's) are pooled the same way (the mean of their logits).

    Returns a `GroupedQueryAttention` (`MultiQueryAttention` when kv_heads == 1) for a plain
    multi-head module, a module of the same class for a subclass (e.g. MoHAttention); same dtype and
    device. Head h of the result reads the mean of the KV heads its group read before.
    """
    if not isinstance(module, MultiheadAttention):
        raise TypeError(f"gqa_from_mha: module must be an attnzoo.nn.MultiheadAttention, got {type(module).__name__}")
    kv_heads = check_int("gqa_from_mha", "kv_heads", kv_heads)
    old = module.kv_heads
    if kv_heads > old or old % kv_heads:
        raise ValueError(f"gqa_from_mha: kv_heads must divide the module's kv_heads={old} (groups of consecutive "
                         f"KV heads are mean-pooled); got kv_heads={kv_heads}")
    config = module.config
    config["kv_heads"] = kv_heads
    if type(module) in (MultiheadAttention, GroupedQueryAttention, MultiQueryAttention):
        cls = MultiQueryAttention if kv_heads == 1 else GroupedQueryAttention
    else:
        cls = type(module)
    if cls is MultiQueryAttention:
        del config["kv_heads"]
    ref = next(module.parameters())
    new = cls(**config).to(device=ref.device, dtype=ref.dtype)
    state = module.state_dict()
    for name, t in list(state.items()):
        if name.startswith(("k_proj.", "v_proj.")) or (name.startswith("learned.") and ".up." in name):
            state[name] = _pool_rows(t, old, kv_heads)
    new.load_state_dict(state)
    new.train(module.training)
    return new
