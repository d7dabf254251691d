"""`affine_state`: the recurrent variants that declare it have a final state A * S0 + final(0) for every
initial state S0 (A elementwise), which LASP-2 sequence parallelism relies on; the others are refused by
it with the reason, never combined wrongly."""
import pytest
import torch

import attnzoo as az
from attnzoo.backends.distributed.lasp2 import lasp2_why_not
from attnzoo.bench.cases import make_inputs
from attnzoo.core.api import variant_class
from attnzoo.core.recurrent import RecurrentVariant

# Parameters that make a variant's state carry over between calls (lln fits alpha/beta per call otherwise).
CARRY = {"lln": {"alpha": 1.0, "beta": 1.0}}
RECURRENT = [i.name for i in az.variants(family="linear") if issubclass(variant_class(i.name), RecurrentVariant)
             and "causal_self" in i.patterns]


def _final(attn, q, k, v, state, inputs):
    _, s = attn(q, k, v, causal=True, initial_state=state, output_final_state=True, **inputs)
    return s


@pytest.mark.parametrize("name", RECURRENT)
def test_declared_affine_states_are_affine_and_others_are_refused(name):
    attn = az.get(name, **CARRY.get(name, {}))
    if not attn.affine_state:
        assert "affine" in lasp2_why_not(attn)
        return
    assert lasp2_why_not(attn) is None
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 13, 8, generator=g, dtype=torch.float64) for _ in range(3))
    inputs = make_inputs(attn, q, k, v, generator=g)
    shape = attn.state_shape(2, 2, 8, 8)
    zeros = torch.zeros(shape, dtype=torch.float64)
    f0 = _final(attn, q, k, v, zeros, inputs)
    a = _final(attn, q, k, v, torch.ones_like(zeros), inputs) - f0
    s0 = torch.rand(shape, generator=g, dtype=torch.float64)
    assert (_final(attn, q, k, v, s0, inputs) - (a * s0 + f0)).abs().max().item() < 1e-9


def test_the_known_non_affine_states_are_refused():
    for name in ("flowformer", "mega", "titans"):
        assert not az.get(name).affine_state and "affine" in lasp2_why_not(az.get(name))
        assert "context_parallel" not in az.get(name).info.backends
    assert "context_parallel" in az.get("gla").info.backends
