"""Agent Attention: n agent tokens pooled from the queries aggregate the keys and values by softmax
attention, then broadcast back to the queries by a second softmax attention.

Definition (the paper's agent attention, its eq. O = sigma(Q A^T) sigma(A K^T) V with sigma = softmax):

    A = pool(Q)                      (n agents: the average of the queries in n equal bins of positions,
                                      bin a covering [floor(a L / n), ceil((a + 1) L / n)), as adaptive
                                      average pooling)
    V_A = softmax(scale A K^T) V     (agents attend to all keys: n x S)
    O   = softmax(scale Q A^T) V_A   (queries attend to the agents: L x n)

The paper shows this is a generalised linear attention: O = M V with the L x S matrix
M = softmax(scale Q A^T) softmax(scale A K^T), rows summing to 1; the reference builds M, the fast
path never does (O(L n D + n S D)). The agents come from every query, so the mechanism is
non-causal: it serves noncausal_self and noncausal_cross and refuses causal calls. With GQA each
query head pools its own agents and reads its KV head's keys. The paper's agent bias and depthwise
convolution on V are learned parts of its block, not of this operator.
"""
from __future__ import annotations

import math

import torch

from ...core.info import NONCAUSAL_CROSS, NONCAUSAL_SELF, Paper, positive_int
from ...core.recurrent import group_queries, ungroup
from ...core.registry import register
from ...core.variant import Variant


def agent_bins(length: int, agents: int) -> list[tuple[int, int]]:
    """[start, end) of each agent's bin of query positions (adaptive average pooling's bins)."""
    return [(a * length // agents, math.ceil((a + 1) * length / agents)) for a in range(agents)]


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@register
class Agent(Variant):
    name = "agent"
    family = "linear"
    exact = False
    patterns = (NONCAUSAL_SELF, NONCAUSAL_CROSS)
    summary = ("Agent Attention: n agents A pooled from the queries (adaptive average over n bins of positions) "
               "gather the values by softmax(scale A K^T) V, and the queries read the agents by "
               "softmax(scale Q A^T): O = softmax(scale Q A^T) softmax(scale A K^T) V, a generalised linear "
               "attention of cost O((L + S) n D). Non-causal only (the agents come from every query).")
    paper = Paper("Agent Attention: On the Integration of Softmax and Linear Attention", 2023, "2312.08874")
    params = (positive_int("agents", 49, "number n of agent tokens (49 = the paper's 7 x 7 pool)"),)
    budget_param = "agents"
    cost = "O((Sq + Sk) n D) time, O((Sq + Sk) n) memory per head; no Sq x Sk tensor"
    state_size = "none: non-causal (the agents come from every query)"

    def _reference(self, q, k, v, call):
        """The L x S matrix M = softmax(scale Q A^T) softmax(scale A K^T), then M V."""
        dtype, acc = q.dtype, _acc(q.dtype)
        q, k, v = q.to(acc), k.to(acc), v.to(acc)
        agents = torch.stack([q[:, :, a:b].mean(2) for a, b in agent_bins(q.shape[2], self.config["agents"])], 2)
        qg, ag = group_queries(q, k.shape[1]), group_queries(agents, k.shape[1])   # (B, Hkv, G, ., D)
        to_agents = (call.scale * qg @ ag.transpose(-1, -2)).softmax(-1)            # (B, Hkv, G, L, n)
        to_keys = (call.scale * ag @ k.unsqueeze(2).transpose(-1, -2)).softmax(-1)  # (B, Hkv, G, n, S)
        return ungroup((to_agents @ to_keys) @ v.unsqueeze(2)).to(dtype)

    def forward_torch(self, q, k, v, call):
        acc = _acc(q.dtype)
        qa = q.to(acc)
        b, h, length, d = qa.shape
        agents = torch.nn.functional.adaptive_avg_pool1d(qa.reshape(b * h, length, d).transpose(1, 2),
                                                         self.config["agents"]).transpose(1, 2).view(b, h, -1, d)
        qg, ag = group_queries(qa, k.shape[1]), group_queries(agents, k.shape[1])
        agent_v = (call.scale * ag @ k.to(acc).unsqueeze(2).transpose(-1, -2)).softmax(-1) @ v.to(acc).unsqueeze(2)
        return ungroup((call.scale * qg @ ag.transpose(-1, -2)).softmax(-1) @ agent_v).to(q.dtype)
