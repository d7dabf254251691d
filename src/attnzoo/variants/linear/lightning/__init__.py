"""Lightning attention: linear attention with a fixed per-head decay (TransNormerLLM, Lightning
Attention-2, MiniMax-01)."""
from __future__ import annotations

import torch

from ....core.info import Paper, nonneg_int, positive_int
from ....core.registry import register
from .._base import LinearVariant, per_head_param
from .._decay import per_head
from .chunk import lightning_chunk
from .naive import lightning_decays, lightning_parallel, lightning_step


@register
class Lightning(LinearVariant):
    name = "lightning"
    affine_state = True
    summary = ("Lightning attention: o_t = scale * sum_{s<=t} lambda^(t-s) (q_t . k_s) v_s, i.e. "
               "S_t = lambda S_{t-1} + k_t^T v_t; one decay per KV head, by default TransNormerLLM's schedule as "
               "fla's lightning_attn, lambda_h = exp(-(8h/H)(1 - layer_idx/num_layers)) (head 0 does not decay), or "
               "`decay` (e.g. MiniMax-01's slopes exp(-slope_h)). The chunk form is Lightning Attention-2's "
               "intra-block tile plus inter-block state. No normaliser (TransNormerLLM's SRMSNorm belongs to the "
               "layer). Paper: Lightning Attention-2; also 'Scaling TransNormer to 175 Billion Parameters' (2023, "
               "arXiv:2307.14995) and 'MiniMax-01: Scaling Foundation Models with Lightning Attention' (2025, "
               "arXiv:2501.08313).")
    paper = Paper("Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large "
                  "Language Models", 2024, "2401.04658")
    params = (
        nonneg_int("layer_idx", 0, "this layer's index l in the decay schedule (0 = first layer, fastest decay)"),
        positive_int("num_layers", 1, "the model's number of layers L in the decay schedule (layer_idx < num_layers)"),
        per_head_param("decay", None, "lambda per KV head instead of the schedule (layer_idx and num_layers are "
                       "then unused): one float for all heads or one per KV head, each in (0, 1] (1 = no decay)",
                       0.0, 1.0, False,
                       "None, a float in (0, 1] or a non-empty tuple of floats in (0, 1] (one per KV head)"),
        positive_int("chunk_size", 64, "tokens per block of the chunk form (Lightning Attention-2's block size)"),
    )
    cost = "chunk: O(S C D + S D Dv) time, O(C^2 + D Dv) memory per head; step: O(D Dv) per token"

    def validate_config(self):
        if self.config["layer_idx"] >= self.config["num_layers"]:
            raise ValueError(f"{self.name}: parameter 'layer_idx' must be < num_layers={self.config['num_layers']}, "
                             f"got {self.config['layer_idx']}")

    def validate_call(self, call):
        self.check_heads("decay", self.config["decay"], call.shapes.kv_heads)

    def decays(self, heads: int, like: torch.Tensor) -> torch.Tensor:
        """lambda per KV head, (heads,)."""
        if self.config["decay"] is None:
            return lightning_decays(heads, self.config["layer_idx"], self.config["num_layers"], like.dtype, like.device)
        self.check_heads("decay", self.config["decay"], heads)
        return per_head(self.config["decay"], heads, like)

    def parallel(self, q, k, v, call, state, inputs):
        return lightning_parallel(q, k, v, self.decays(k.shape[1], state), call.scale, state)

    def chunk(self, q, k, v, call, state, inputs):
        return lightning_chunk(q, k, v, self.decays(k.shape[1], state), call.scale, state, self.config["chunk_size"])

    def step(self, q_t, k_t, v_t, state, *, scale=None, **inputs):
        _, hkv, d, _ = self.check_step(q_t, k_t, v_t, state, inputs)
        return lightning_step(q_t, k_t, v_t, self.decays(hkv, state), self.step_scale(scale, d), state)
