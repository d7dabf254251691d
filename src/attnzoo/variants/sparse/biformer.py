"""BiFormer's Bi-Level Routing Attention. Tokens lie row-major on an H x W grid (`grid`), cut into
rh x rw rectangular regions (`regions`). Region level: each region's mean query and mean key; the
affinity of region i to region j is the dot product of i's mean query and j's mean key over every head's
channels (the paper routes once per layer, on the full channel dimension, so all heads share the
routing); each region keeps its `top_k` regions by affinity (its own always among them here, so that
every query reads its own region). Token level: every query of region i attends, with exact softmax, to
all keys of the regions region i keeps. Non-causal self-attention (an image), as in the paper; its
local-context enhancement (a learned depthwise convolution on V added to the output) is not attention
and is left to the model."""
from __future__ import annotations

import torch

from ...core.info import NONCAUSAL_SELF, Paper, Param, positive_int
from ...core.registry import register
from ...core.selection import Selection, SelectionVariant

PAPER = Paper("BiFormer: Vision Transformer with Bi-Level Routing Attention", 2023, "2303.08810")


def _pair(v) -> bool:
    return (isinstance(v, (tuple, list)) and len(v) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in v))


def region_tokens(grid, regions, device=None) -> torch.Tensor:
    """(R, region size) long: the token indices (row-major on `grid`) of each region, regions row-major."""
    (h, w), (rh, rw) = grid, regions
    ys = torch.arange(h, device=device).view(rh, h // rh, 1, 1)
    xs = torch.arange(w, device=device).view(1, 1, rw, w // rw)
    tok = ys * w + xs                                                # (rh, h/rh, rw, w/rw)
    return tok.permute(0, 2, 1, 3).reshape(rh * rw, -1)


def region_of(grid, regions, device=None) -> torch.Tensor:
    """(H * W,) long: the region of each token."""
    (h, w), (rh, rw) = grid, regions
    y, x = torch.arange(h * w, device=device) // w, torch.arange(h * w, device=device) % w
    return (y // (h // rh)) * rw + x // (w // rw)


@register
class BiFormer(SelectionVariant):
    name = "biformer"
    summary = ("Bi-Level Routing Attention on an H x W grid of tokens cut into rh x rw regions: region affinity = "
               "mean query . mean key over all heads' channels (one routing shared by the heads), each region "
               "keeps its top_k regions (its own always among them), and each query attends with exact softmax "
               "to every key of its region's kept regions. Non-causal self-attention; Sq = Sk = H * W. "
               "top_k >= rh * rw is full attention.")
    paper = PAPER
    patterns = (NONCAUSAL_SELF,)
    params = (
        Param("grid", None, "(H, W): tokens row-major on an H x W grid, H * W = Sq = Sk (required at call time)",
              (tuple, list, type(None)), lambda v: v is None or _pair(v), "None or (H, W), two positive ints"),
        Param("regions", (4, 4), "(rh, rw): regions along H and along W (the paper's S x S); rh must divide H "
                                 "and rw divide W", (tuple, list), _pair, "(rh, rw), two positive ints"),
        positive_int("top_k", 4, "regions each region's queries read, its own region included"),
    )
    cost = "route: O((rh rw)^2 D H); attend: O(S top_k (S / (rh rw)) D)"
    budget_param = "top_k"

    def validate_config(self) -> None:
        grid, regions = self.config["grid"], self.config["regions"]
        if grid is not None and (grid[0] % regions[0] or grid[1] % regions[1]):
            raise ValueError(f"{self.name}: regions={tuple(regions)} must divide grid={tuple(grid)} (rh | H and "
                             f"rw | W)")

    def validate_call(self, call) -> None:
        grid = self.config["grid"]
        s = call.shapes
        if grid is None:
            raise ValueError(f"{self.name} needs grid=(H, W) with H * W = Sq = Sk = {s.sk}")
        if grid[0] * grid[1] != s.sk:
            raise ValueError(f"{self.name}: grid={tuple(grid)} holds {grid[0] * grid[1]} tokens, but Sq = Sk = {s.sk}")

    def route(self, q, k, call) -> torch.Tensor:
        """(B, R, n) long: the regions each region keeps, its own first-ranked."""
        s = call.shapes
        acc = torch.promote_types(q.dtype, torch.float32)
        tokens = region_tokens(self.config["grid"], self.config["regions"], q.device)       # (R, r)
        q_r = q.to(acc)[:, :, tokens].mean(-2)                                                 # (B, Hq, R, D)
        k_r = k.to(acc)[:, :, tokens].mean(-2)                                                 # (B, Hkv, R, D)
        r = tokens.shape[0]
        affinity = (q_r.view(s.batch, s.kv_heads, s.group, r, s.d) @ k_r.unsqueeze(2).transpose(-1, -2)).sum((1, 2))
        affinity = affinity.masked_fill(torch.eye(r, dtype=torch.bool, device=q.device), torch.inf)
        return affinity.topk(min(self.config["top_k"], r), dim=-1).indices

    def select(self, q, k, call) -> Selection:
        s = call.shapes
        grid, regions = self.config["grid"], self.config["regions"]
        tokens = region_tokens(grid, regions, q.device)
        kept = self.route(q, k, call)[:, region_of(grid, regions, q.device)]                  # (B, S, n)
        idx = tokens[kept].flatten(-2)                                                         # (B, S, n * r)
        return Selection(idx.unsqueeze(1).expand(s.batch, s.q_heads, *idx.shape[1:]), 1, s.sk)

    def forward_torch(self, q, k, v, call):
        """Region by region, as the paper: the keys and values of a region's kept regions are gathered once
        for all its queries (not once per query), then one dense softmax per region."""
        s = call.shapes
        acc = torch.promote_types(q.dtype, torch.float32)
        grid, regions = self.config["grid"], self.config["regions"]
        tokens = region_tokens(grid, regions, q.device)                                        # (R, r)
        n_regions, size = tokens.shape
        keys = tokens[self.route(q, k, call)].flatten(-2)                                      # (B, R, n r)
        batch = torch.arange(s.batch, device=q.device).view(-1, 1, 1)
        kg = k[batch, :, keys].to(acc).permute(0, 3, 1, 2, 4).unsqueeze(2)                     # (B, Hkv, 1, R, n r, D)
        vg = v[batch, :, keys].to(acc).permute(0, 3, 1, 2, 4).unsqueeze(2)
        qg = q[:, :, tokens].to(acc).view(s.batch, s.kv_heads, s.group, n_regions, size, s.d)
        p = torch.softmax((qg @ kg.transpose(-1, -2)) * call.scale, dim=-1)                   # (B, Hkv, G, R, r, n r)
        out = (p @ vg).view(s.batch, s.q_heads, n_regions * size, s.dv)
        return out[:, :, torch.argsort(tokens.flatten())].to(q.dtype)
