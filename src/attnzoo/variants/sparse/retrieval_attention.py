"""RetrievalAttention: each query reads a static pattern (the first `sinks` keys and the `window` keys up to
its own position) plus the `top_k` keys of the rest with the largest inner product q.k, found by
approximate nearest-neighbour search over the keys (the paper keeps the KV vectors in CPU memory and
searches an index built on them), with exact softmax over the union.

The index is faiss's HNSW graph under inner product (`index="hnsw"`, the optional extra
`attnzoo[retrieval]`); `index="exact"` is the exact top-k the index approximates (no faiss needed, and the
fallback, with a one-time warning, when faiss is not installed). The paper's own attention-aware index
(built from the queries' distribution, to cope with queries that are out of the keys' distribution) is not
reproduced: the stock HNSW graph shows what that OOD problem costs, measured as recall against the exact
top-k. Whatever the index returns, the output is exact softmax over exactly the selected keys."""
from __future__ import annotations

import warnings

import torch

from ...core.info import Paper, Param, nonneg_int, positive_int
from ...core.registry import register
from ...core.selection import Selection, SelectionVariant, topk_indices

PAPER = Paper("RetrievalAttention: Accelerating Long-Context LLM Inference via Vector Retrieval", 2024, "2409.10516")
QUERY_TILE = 64
_warned = []


def faiss_module():
    """faiss, or None when the optional extra is not installed."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def far_region(tok: torch.Tensor, pos: torch.Tensor, sinks: int, window: int, causal: bool) -> torch.Tensor:
    """bool, shape of `tok`: key index `tok` is retrievable by the query at position `pos` (broadcast): past
    the sinks, outside the query's window (pos - window, pos], at or before pos under causality."""
    far = (tok >= sinks) & ~((tok > pos - window) & (tok <= pos))
    return far & (tok <= pos) if causal else far


@register
class RetrievalAttention(SelectionVariant):
    name = "retrieval_attention"
    summary = ("Static pattern (the first `sinks` keys and the `window` keys up to the query) plus the top_k other "
               "visible keys by q.k, found by approximate nearest-neighbour search (index='hnsw': faiss's HNSW "
               "graph under inner product, optional extra attnzoo[retrieval]) or exactly (index='exact'); exact "
               "softmax over the union. Without faiss, 'hnsw' falls back to 'exact' with a warning.")
    paper = PAPER
    params = (
        positive_int("top_k", 64, "keys retrieved per query besides the static pattern"),
        nonneg_int("sinks", 4, "initial keys every query reads (the paper's static initial tokens)"),
        nonneg_int("window", 64, "most recent keys, up to and including the query's position, every query reads"),
        Param("index", "hnsw", "nearest-neighbour search: 'hnsw' (faiss HNSW graph, inner product) or 'exact'",
              (str,), lambda v: v in ("hnsw", "exact"), "'hnsw' or 'exact'"),
        positive_int("ef_search", 64, "HNSW search breadth (candidates kept while walking the graph); larger is "
                                      "slower and closer to exact"),
        positive_int("graph_degree", 32, "HNSW neighbours per node (faiss's M)"),
    )
    cost = ("index build: O(Sk log Sk D) per kv head; search: about O(ef_search log Sk D) per query (HNSW); "
            "attend: O(Sq (sinks + window + top_k) D)")
    budget_param = "top_k"

    def uses_faiss(self) -> bool:
        if self.config["index"] == "exact":
            return False
        if faiss_module() is None:
            if not _warned:
                warnings.warn("retrieval_attention: faiss is not installed (pip install 'attnzoo[retrieval]'); "
                              "index='hnsw' falls back to the exact top-k", stacklevel=3)
                _warned.append(True)
            return False
        return True

    def select(self, q, k, call) -> Selection:
        s = call.shapes
        sinks, window = self.config["sinks"], self.config["window"]
        pos = s.query_positions(device=q.device).view(-1, 1)
        offsets = torch.arange(window, device=q.device).view(1, -1)
        static = torch.cat([torch.arange(min(sinks, s.sk), device=q.device).view(1, -1).expand(s.sq, -1),
                            pos - window + 1 + offsets], dim=1)                            # (Sq, sinks + window)
        static = torch.where((static >= 0) & (static < s.sk), static, torch.full_like(static, -1))
        retrieved = self.search_hnsw(q, k, call) if self.uses_faiss() else self.search_exact(q, k, call)
        static = static.view(1, 1, s.sq, -1).expand(s.batch, s.q_heads, -1, -1)
        return Selection(torch.cat([static, retrieved], dim=-1), 1, s.sk)

    def search_exact(self, q, k, call) -> torch.Tensor:
        """(B, Hq, Sq, top_k): the top_k keys of each query's far region by exact q.k, -1 where fewer."""
        s = call.shapes
        acc = torch.promote_types(q.dtype, torch.float32)
        kk = k.to(acc).repeat_interleave(s.group, dim=1) if s.group > 1 else k.to(acc)
        keys = torch.arange(s.sk, device=q.device).view(1, -1)
        parts = []
        for a in range(0, s.sq, QUERY_TILE):
            b = min(a + QUERY_TILE, s.sq)
            pos = s.query_positions(a, b, q.device).view(-1, 1)
            far = far_region(keys, pos, self.config["sinks"], self.config["window"], call.causal)
            scores = (q[:, :, a:b].to(acc) @ kk.transpose(-1, -2)).masked_fill(~far, -torch.inf)
            parts.append(_pad_to(topk_indices(scores, self.config["top_k"]), self.config["top_k"]))
        return torch.cat(parts, dim=2)

    def search_hnsw(self, q, k, call) -> torch.Tensor:
        """(B, Hq, Sq, top_k): per (batch row, kv head) an HNSW graph over its keys; per tile of queries one
        search restricted to the tile's far range, asking for enough neighbours that each query keeps top_k
        after dropping what lies outside its own far region (in the index's order, best first)."""
        faiss = faiss_module()
        s = call.shapes
        sinks, window, top_k = self.config["sinks"], self.config["window"], self.config["top_k"]
        out = torch.full((s.batch, s.q_heads, s.sq, top_k), -1, dtype=torch.long)
        keys_np = k.detach().to("cpu", torch.float32).contiguous().numpy()
        queries = q.detach().to("cpu", torch.float32)
        threads = faiss.omp_get_max_threads()
        for b in range(s.batch):
            for h in range(s.kv_heads):
                index = faiss.IndexHNSWFlat(s.d, self.config["graph_degree"], faiss.METRIC_INNER_PRODUCT)
                faiss.omp_set_num_threads(1)  # a single-threaded build is deterministic: every select agrees
                try:
                    index.add(keys_np[b, h])
                finally:
                    faiss.omp_set_num_threads(threads)
                heads = slice(h * s.group, (h + 1) * s.group)
                for a in range(0, s.sq, QUERY_TILE):
                    e = min(a + QUERY_TILE, s.sq)
                    last = s.sk - s.sq + e - 1
                    hi = min(last - window + 1, s.sk) if call.causal else s.sk
                    if hi <= sinks:
                        continue
                    want = min(top_k + window + (e - a), hi - sinks)
                    params = faiss.SearchParametersHNSW(sel=faiss.IDSelectorRange(sinks, hi),
                                                        efSearch=max(self.config["ef_search"], want))
                    tile = queries[b, heads, a:e].reshape(-1, s.d).contiguous().numpy()
                    _, found = index.search(tile, want, params=params)
                    found = torch.from_numpy(found).view(s.group, e - a, want)
                    pos = s.query_positions(a, e, "cpu").view(1, -1, 1)
                    keep = (found >= 0) & far_region(found, pos, sinks, window, call.causal)
                    keep &= keep.cumsum(-1) <= top_k
                    order = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices[..., :top_k]
                    picked = torch.where(keep.gather(-1, order), found.gather(-1, order), -1)
                    out[b, heads, a:e] = _pad_to(picked, top_k)
        return out.to(q.device)


def _pad_to(idx: torch.Tensor, n: int) -> torch.Tensor:
    """idx (..., m) with m <= n, padded with -1 to (..., n)."""
    return torch.nn.functional.pad(idx, (0, n - idx.shape[-1]), value=-1)
