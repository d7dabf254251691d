"""Attention rollout and attention flow ("Quantifying Attention Flow in Transformers", Abnar &
Zuidema, 2020): how much each input token feeds one output position through all layers.

Each layer's head-averaged attention plus the residual connection, A' = (A + I) / 2, is a layer
of a graph whose edge capacities are A' entries. Rollout multiplies the layers; flow is the
maximum flow from an input token at the bottom to the output node at the top. The layered graph
of a short sentence is small (layers x tokens nodes), so an exact max-flow written here (Dinic's
algorithm) serves, with no graph library needed.
"""
from __future__ import annotations

from collections import deque

import torch

from ...core.info import Paper
from ..capture import capture_attention
from ..session import Session
from .base import Probe

EPS = 1e-12


def residual_maps(maps: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer (S, S): head-averaged attention with the residual, (A + I) / 2, rows summing to 1."""
    out = []
    for a in maps:
        a = a.double().mean(0) if a.dim() == 3 else a.double()
        a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], dtype=torch.float64)
        out.append(a / a.sum(-1, keepdim=True))
    return out


def rollout(maps: list[torch.Tensor]) -> torch.Tensor:
    """(S, S): row i = how much each input token reaches position i at the top, by rollout."""
    layers = residual_maps(maps)
    r = torch.eye(layers[0].shape[-1], dtype=torch.float64)
    for a in layers:
        r = a @ r
    return r


def max_flow(n: int, edges: list[tuple[int, int, float]], source: int, sink: int) -> float:
    """Exact maximum flow (Dinic) on a graph of `n` nodes and directed capacitated edges."""
    head, to, cap = [[] for _ in range(n)], [], []
    for u, v, c in edges:
        head[u].append(len(to)); to.append(v); cap.append(c)
        head[v].append(len(to)); to.append(u); cap.append(0.0)
    flow = 0.0
    while True:
        level = [-1] * n
        level[source] = 0
        queue = deque([source])
        while queue:
            u = queue.popleft()
            for e in head[u]:
                if cap[e] > EPS and level[to[e]] < 0:
                    level[to[e]] = level[u] + 1
                    queue.append(to[e])
        if level[sink] < 0:
            return flow
        nxt = [0] * n

        def push(u: int, limit: float) -> float:
            if u == sink:
                return limit
            while nxt[u] < len(head[u]):
                e = head[u][nxt[u]]
                v = to[e]
                if cap[e] > EPS and level[v] == level[u] + 1:
                    got = push(v, min(limit, cap[e]))
                    if got > EPS:
                        cap[e] -= got
                        cap[e ^ 1] += got
                        return got
                nxt[u] += 1
            return 0.0

        while (got := push(source, float("inf"))) > EPS:
            flow += got


def attention_flow(maps: list[torch.Tensor], target: int) -> torch.Tensor:
    """(S,): max flow from each input token to position `target` at the top layer."""
    layers = residual_maps(maps)
    s, n_layers = layers[0].shape[-1], len(layers)
    edges = [((l - 1) * s + j, l * s + i, float(a[i, j]))
             for l, a in enumerate(layers, start=1) for i in range(s) for j in range(s) if a[i, j] > EPS]
    n = (n_layers + 1) * s
    return torch.tensor([max_flow(n, edges, j, n_layers * s + target) for j in range(s)], dtype=torch.float64)


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(EPS))


def input_gradients(session: Session, ids: torch.Tensor, target: int) -> torch.Tensor:
    """(S,): |gradient x input| of each token's embedding, for the model's top logit at `target`
    (causal LM) or the norm of the top hidden state at `target` (encoder)."""
    emb = session.model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = session.model(inputs_embeds=emb, use_cache=False)
    objective = out.logits[0, target].max() if hasattr(out, "logits") else out.last_hidden_state[0, target].norm()
    (grad,) = torch.autograd.grad(objective, emb)
    return (grad * emb).sum(-1)[0].abs().detach().double()


def attribution_sentence(session: Session, max_tokens: int = 18) -> torch.Tensor:
    """A short real sentence (the paper's graphs are of one sentence), as ids (1, S)."""
    from ... import models

    tok = session.tokenizer
    for sentence in models.stdlib_text("heldout").split(". "):
        ids = tok(sentence.strip() + ".", return_tensors="pt", add_special_tokens=not session.causal)["input_ids"]
        if 10 <= ids.shape[1] <= max_tokens:
            return ids
    raise RuntimeError(f"no sentence of 10 to {max_tokens} tokens in the held-out text")


class RolloutFlow(Probe):
    name = "rollout_flow"
    paper = Paper("Quantifying Attention Flow in Transformers", 2020, "2005.00928")
    about = ("token attributions for one output position (the last token of a causal LM, [CLS] of an encoder) "
             "by raw last-layer attention, rollout and flow, with their Spearman correlation to |gradient x input|")

    def run(self, session):
        ids = attribution_sentence(session)
        target = ids.shape[1] - 1 if session.causal else 0
        maps = capture_attention(session.model, ids)
        ordered = [maps[i][0] for i in sorted(maps)]
        attributions = {
            "raw_attention": ordered[-1].double().mean(0)[target],
            "rollout": rollout(ordered)[target],
            "flow": attention_flow(ordered, target),
            "gradient_x_input": input_gradients(session, ids, target),
        }
        tokens = [session.tokenizer.decode([int(t)]) for t in ids[0]]
        grad = attributions["gradient_x_input"]
        summary = {"target": f"{target} ({tokens[target]!r})",
                   "spearman_with_gradient": {k: round(_spearman(v, grad), 3) for k, v in attributions.items()
                                              if k != "gradient_x_input"}}
        details = {"tokens": tokens, "target": target,
                   "attributions": {k: [round(float(x), 5) for x in v] for k, v in attributions.items()}}
        return self.result({}, summary, details)
