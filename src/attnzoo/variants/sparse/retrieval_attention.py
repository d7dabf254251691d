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
SEARCH_TILE = 16  # queries per HNSW search: each search asks for top_k + SEARCH_TILE - 1 neighbours (causal)
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
               "graph under inner product, from the optional extra 'retrieval') or exactly (index='exact'); exact "
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
        """(B, Hq, Sq, top_k): per (batch row, kv head) an HNSW graph over the keys past the sinks, grown as the
        queries advance (under causality it holds, for each tile of queries, the keys up to the last query's
        window, as the paper's index grows while decoding). One search per tile asks for enough neighbours that
        each query keeps top_k after dropping what lies outside its own far region (in the index's order, best
        first): under causality the last query's window hides at most tile - 1 keys of an earlier query's
        region; without it a query's own window hides at most `window` keys. A request for every key held is
        answered with all of them, ranked by exact score."""
        faiss = faiss_module()
        s = call.shapes
        out = torch.full((s.batch, s.q_heads, s.sq, self.config["top_k"]), -1, dtype=torch.long)
        keys_np = k.detach().to("cpu", torch.float32).contiguous().numpy()
        queries = q.detach().to("cpu", torch.float32)
        threads = faiss.omp_get_max_threads()
        try:
            self._search_all(faiss, keys_np, queries, out, call)
        finally:
            faiss.omp_set_num_threads(threads)
        return out.to(q.device)

    def _search_all(self, faiss, keys_np, queries, out, call) -> None:
        s = call.shapes
        sinks, window, top_k = self.config["sinks"], self.config["window"], self.config["top_k"]
        searching = torch.get_num_threads()  # as many threads as torch may use (the bench's choice on a busy CPU)
        faiss.omp_set_num_threads(searching)
        for b in range(s.batch):
            for h in range(s.kv_heads):
                index = faiss.IndexHNSWFlat(s.d, self.config["graph_degree"], faiss.METRIC_INNER_PRODUCT)
                heads = slice(h * s.group, (h + 1) * s.group)
                for a in range(0, s.sq, SEARCH_TILE):
                    e = min(a + SEARCH_TILE, s.sq)
                    hi = min(s.sk - s.sq + e - window, s.sk) if call.causal else s.sk   # keys [sinks, hi) held
                    if hi <= sinks:
                        continue
                    if index.ntotal < hi - sinks:
                        faiss.omp_set_num_threads(1)  # single-threaded adds are deterministic: every select agrees
                        index.add(keys_np[b, h, sinks + index.ntotal:hi])
                        faiss.omp_set_num_threads(searching)
                    want = min(top_k + (e - a - 1 if call.causal else window), hi - sinks)
                    tile = queries[b, heads, a:e].reshape(-1, s.d)
                    if want == hi - sinks:
                        scores = tile @ torch.from_numpy(keys_np[b, h, sinks:hi]).T
                        found = scores.argsort(dim=-1, descending=True, stable=True)
                    else:
                        index.hnsw.efSearch = max(self.config["ef_search"], want)
                        found = torch.from_numpy(index.search(tile.contiguous().numpy(), want)[1])
                    found = torch.where(found >= 0, found + sinks, -1).view(s.group, e - a, want)
                    pos = s.query_positions(a, e, "cpu").view(1, -1, 1)
                    keep = (found >= 0) & far_region(found, pos, sinks, window, call.causal)
                    keep &= keep.cumsum(-1) <= top_k
                    order = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices[..., :top_k]
                    picked = torch.where(keep.gather(-1, order), found.gather(-1, order), -1)
                    out[b, heads, a:e] = _pad_to(picked, top_k)


def _pad_to(idx: torch.Tensor, n: int) -> torch.Tensor:
    """idx (..., m) with m <= n, padded with -1 to (..., n)."""
    return torch.nn.functional.pad(idx, (0, n - idx.shape[-1]), value=-1)
