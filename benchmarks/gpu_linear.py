"""The `triton` backend's linear-attention kernels on one GPU: correctness by FlashAttention's rule and
speed against flash-linear-attention (fla), all in one run.

    PYTHONPATH=src python benchmarks/gpu_linear.py --out gpu_linear.json [--quick] [--no-sweep | --sweep-sub]

(results/gpu_linear_h200.json: `--no-sweep --no-torch`, i.e. the TUNE defaults of backends/triton/linear.py,
which came from the full sweep of an earlier run and the changes its notes list; fla-core 0.6.0 from a wheel.)

1. correctness (bf16, B2 H4 S1000 D128, gates typical / near 0 (strong decay) / near 1 (almost none)):
   forward o and gradients dq dk dv dg of our kernels, of the same computation by our torch chunk path in
   bf16 arithmetic (`decay_chunk` with a bf16 state: FlashAttention's baseline), of the torch path as the
   `torch` backend runs it (bf16 inputs, float32 state) and of fla's chunk kernel, all against float64
   (`decay_chunk` in float64, which equals the dense definition to 1e-10: tests/variants). Rule: max abs
   error <= 2 x the bf16 torch path's. Also HIGH_PRECISION (float32 intermediates) and the public API
   (GQA, cross pattern, initial/final state, fp16/fp32).
2. sweep: a few launch settings (warps, stages, tiles) timed per kernel with the profiler at the two
   benchmark shapes; each kernel then takes its fastest (`tune` in the JSON; the defaults in TUNE come
   from this).
3. timing (triton.testing.do_bench medians): B4 H16 S8192 D128 and B1 H16 S65536 D128 bf16, forward and
   forward+backward, ours vs fla's chunk_simple_gla (one scalar log gate per token and head) and chunk_gla
   (per key dimension), and our torch chunk path. Each library gets its own layout ((B, H, S, D) ours,
   (B, S, H, D) fla's); gates float32. fla autotunes over a pruned set of its configs (warps 4/8, stages
   2/3, 64-wide tiles) so that its compilation fits the device budget. fla 0.6.0 refuses chunk_simple_gla's
   gated backward on Hopper with Triton < 3.7.1 (fla #640); the device has 3.6, so the guard is lifted to
   time it and its error is reported next to ours.
4. feature maps (`--feature-maps`, or alone with `--only-feature-maps`): `based` (2nd-order Taylor features of
   16-dim q/k, 273 features, Dv 128, normalised) and normalised `linear` (elu+1) through the public API
   (`backend="triton"`), against fla's parallel_based and fused_chunk_based, and chunk_linear_attn(normalize=True)
   on the same elu+1 features; errors of forward and gradients vs float64 with FlashAttention's rule (baseline:
   our torch chunk path in bf16 arithmetic), then time at B4 H16 S8192 and B1 H16 S65536. `based` runs its
   quadratic-form kernels up to based.PARALLEL_MAX_LEN keys and the chunk kernels beyond (both checked by the
   rule); `based_crossover` times both paths from 4k to 64k; `--sweep-based` first picks their launch settings.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
import traceback
import types
import warnings

import torch
import torch.nn.functional as F

import attnzoo as az
from attnzoo.backends.triton import based as TB
from attnzoo.backends.triton import linear as L
from attnzoo.variants.linear._decay import decay_chunk

T0 = time.time()
DEV = os.environ.get("GPU_LINEAR_DEVICE", "cuda")   # "cpu" + TRITON_INTERPRET=1: a dry run of this script
RESULT: dict = {}
OUT = "gpu_linear.json"
KERNELS = {"_fwd_h_kernel": "fwd_h", "_fwd_o_kernel": "fwd_o", "_gla_fwd_A_kernel": "gla_A",
           "_bwd_dh_kernel": "bwd_dh", "_bwd_dv_kernel": "bwd_dv", "_bwd_dqk_kernel": "bwd_dqk",
           "_gla_bwd_dA_kernel": "gla_dA", "_gla_bwd_intra_kernel": "gla_intra", "_gla_bwd_inter_kernel": "gla_inter"}


def save():
    RESULT["elapsed_s"] = round(time.time() - T0, 1)
    with open(OUT, "w") as f:
        json.dump(RESULT, f, indent=1, default=str)


def section(name):
    def deco(fn):
        def run(*a, **k):
            t = time.time()
            print(f"== {name} (t={t - T0:.0f}s)", flush=True)
            try:
                out = fn(*a, **k)
            except Exception:  # noqa: BLE001 - record and go on
                RESULT.setdefault("errors", {})[name] = traceback.format_exc()
                print(traceback.format_exc(), flush=True)
                out = None
            RESULT.setdefault("section_s", {})[name] = round(time.time() - t, 1)
            save()
            return out
        return run
    return deco


# ---- inputs ------------------------------------------------------------------------------------------------
def gates(kind, regime, b, h, s, d, device=None):
    device = device or DEV
    if kind == "none":
        return None
    shape = (b, h, s) if kind == "scalar" else (b, h, s, d)
    shift = {"typical": 0.0, "near0": -6.0, "near1": 7.0}[regime]   # gate exp(g): ~0.5, ~0.0025, ~0.999
    return F.logsigmoid(torch.randn(shape, device=device) + shift)


def make(kind, regime, b, h, s, d, dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    q, k, v = (torch.randn(b, h, s, d, device=DEV).to(dtype) for _ in range(3))
    return q, k, v, gates(kind, regime, b, h, s, d)


def to_fla(t):
    return None if t is None else t.transpose(1, 2).contiguous()


def from_fla(t):
    return None if t is None else t.transpose(1, 2)


def fla_fn(kind):
    from fla.ops.gla import chunk_gla
    from fla.ops.simple_gla import chunk_simple_gla

    if kind == "dim":
        return lambda q, k, v, g, scale: chunk_gla(q, k, v, g, scale=scale)[0]
    return lambda q, k, v, g, scale: chunk_simple_gla(q, k, v, g, scale=scale)[0]


def fla_gate(g):
    if g is None:
        return None
    return g.transpose(1, 2).contiguous()       # (B, H, S[, K]) -> (B, S, H[, K])


def errs(out, grads, ref, ref_grads):
    row = {"o": [(out.double() - ref).abs().max().item(), ((out.double() - ref).norm() / ref.norm()).item()]}
    for n, a, r in zip(("dq", "dk", "dv", "dg"), grads, ref_grads):
        if a is not None and r is not None:
            row[n] = [(a.double() - r).abs().max().item(), ((a.double() - r).norm() / r.norm()).item()]
    return row


def run_impl(impl, q, k, v, g, scale, do):
    """(o, (dq, dk, dv, dg)) of one implementation on bf16 q/k/v, float32 g."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    gl = None if g is None else g.detach().clone().requires_grad_()
    B, H, _, K = q.shape
    if impl in ("ours", "ours_hp"):   # ours_hp: the caller sets L.HIGH_PRECISION
        o, _ = L.chunk_decay(*leaves, gl, scale)
    elif impl == "torch_bf16":        # the torch chunk path in bf16 arithmetic (state and gates too)
        o = decay_chunk(*leaves, gl, scale, torch.zeros(B, H, K, v.shape[-1], device=DEV, dtype=torch.bfloat16),
                        64)[0]
    elif impl == "torch_path":        # what backend="torch" runs: bf16 inputs, float32 state, bf16 output
        o = decay_chunk(*leaves, gl, scale, torch.zeros(B, H, K, v.shape[-1], device=DEV), 64)[0].to(q.dtype)
    elif impl.startswith("fla"):
        fq, fk, fv = (to_fla(t).detach().requires_grad_() for t in leaves)
        fg = None if gl is None else fla_gate(gl).detach().requires_grad_()
        o = from_fla(fla_fn("dim" if g is not None and g.dim() == 4 else "scalar")(fq, fk, fv, fg, scale))
        wrt = [fq, fk, fv] + ([fg] if fg is not None else [])
        got = torch.autograd.grad(o, wrt, do.to(o.dtype))
        grads = [from_fla(t) for t in got[:3]] + [from_fla(got[3]) if fg is not None else None]
        return o.detach(), grads
    else:
        raise ValueError(impl)
    wrt = leaves + ([gl] if gl is not None else [])
    got = torch.autograd.grad(o, wrt, do.to(o.dtype))
    return o.detach(), list(got[:3]) + [got[3] if gl is not None else None]


CASES = [("none", "typical")] + [(kind, r) for kind in ("scalar", "dim") for r in ("typical", "near0", "near1")]


def reference(kind, regime):
    b, h, s, d = CSHAPE
    q, k, v, g = make(kind, regime, b, h, s, d)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    gl = None if g is None else g.double().requires_grad_()
    ref = decay_chunk(*leaves, gl, d ** -0.5, torch.zeros(b, h, d, d, device=DEV, dtype=torch.float64), 64)[0]
    do = torch.randn_like(ref)
    wrt = leaves + ([gl] if gl is not None else [])
    got = torch.autograd.grad(ref, wrt, do)
    return (q, k, v, g, d ** -0.5, do), ref.detach(), list(got[:3]) + [got[3] if gl is not None else None]


def measure(row, impl, args, ref, ref_grads):
    try:
        o, grads = run_impl(impl, *args)
        row[impl] = errs(o, grads, ref, ref_grads)
        row[impl]["finite"] = bool(torch.isfinite(o).all()) and all(
            bool(torch.isfinite(x).all()) for x in grads if x is not None)
    except Exception as e:  # noqa: BLE001
        row[impl] = {"error": f"{type(e).__name__}: {e}"}


@section("correctness")
def correctness(quick, key="correctness"):
    rows = []
    for kind, regime in CASES:
        args, ref, ref_grads = reference(kind, regime)
        row = {"kind": kind, "regime": regime, "shape": list(CSHAPE)}
        for impl in ("ours", "torch_bf16", "torch_path"):
            measure(row, impl, args, ref, ref_grads)
        if not quick:
            L.HIGH_PRECISION = True
            try:
                measure(row, "ours_hp", args, ref, ref_grads)
                row["ours_hp"] = {n: x for n, x in row.pop("ours_hp").items()}
            finally:
                L.HIGH_PRECISION = False
        ours, base = row["ours"], row["torch_bf16"]
        row["fa_rule"] = {n: ours[n][0] <= 2 * base[n][0] for n in ours if n in base and isinstance(ours[n], list)}
        row["ok"] = bool(ours.get("finite", False)) and bool(row["fa_rule"]) and all(row["fa_rule"].values())
        rows.append(row)
        print(kind, regime, "ok" if row["ok"] else "FAIL", "ours/torch-bf16:",
              {n: f"{ours[n][0]:.2e}/{base[n][0]:.2e}" for n in ours if isinstance(ours[n], list)},
              "hp:" if "ours_hp" in row else "", {n: f"{row['ours_hp'][n][0]:.2e}" for n in row.get("ours_hp", {})
                                                 if isinstance(row["ours_hp"][n], list)}, flush=True)
        RESULT[key] = rows
        save()
    return rows


@section("correctness_fla")
def correctness_fla():
    for row in RESULT.get("correctness", []):
        args, ref, ref_grads = reference(row["kind"], row["regime"])
        measure(row, "fla", args, ref, ref_grads)
        ours = row["ours"]
        if "o" in row["fla"]:
            row["max_err_ratio_vs_fla"] = {n: ours[n][0] / max(row["fla"][n][0], 1e-30) for n in ours
                                           if n in row["fla"] and isinstance(ours[n], list)}
        print(row["kind"], row["regime"], "fla:", {n: f"{row['fla'][n][0]:.2e}" for n in row["fla"]
                                                   if isinstance(row["fla"][n], list)} or row["fla"], flush=True)
        save()


@section("api")
def api_checks():
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)      # a fallback is a failure here
        for name, params, dtypes in (("gla", {}, (torch.bfloat16, torch.float16, torch.float32)),
                                     ("retention", {}, (torch.bfloat16, torch.float32)),
                                     ("lightning", {}, (torch.bfloat16,)),
                                     ("linear", {"normalize": False}, (torch.bfloat16,))):
            attn = az.get(name, **params)
            for dtype in dtypes:
                torch.manual_seed(1)
                b, hq, hkv, sq, sk, d, dv = (2, 8, 2, 300, 1000, 128, 64) if DEV != "cpu" else (1, 4, 2, 30, 70, 32, 16)
                q = torch.randn(b, hq, sq, d, device=DEV, dtype=torch.float64)
                k = torch.randn(b, hkv, sk, d, device=DEV, dtype=torch.float64)
                v = torch.randn(b, hkv, sk, dv, device=DEV, dtype=torch.float64)
                inputs = {"g": F.logsigmoid(torch.randn(b, hkv, sk, d, device=DEV, dtype=torch.float64))} \
                    if name == "gla" else {}
                h0 = torch.randn(b, hkv, d, dv, device=DEV, dtype=torch.float64)
                row = {"variant": name, "dtype": str(dtype)[6:]}
                try:
                    low = [t.to(dtype) for t in (q, k, v)]
                    chosen = next(r for r in attn.explain(*low, causal=True, **inputs) if r["chosen"])["backend"]
                    o, st = attn(*low, causal=True, backend="auto", initial_state=h0.float(),
                                 output_final_state=True, **inputs)
                    ro, rst = attn(q, k, v, causal=True, backend="torch", initial_state=h0, output_final_state=True,
                                   **inputs)
                    row.update(chosen=chosen, o_rel=((o.double() - ro).norm() / ro.norm()).item(),
                               state_rel=((st.double() - rst).norm() / rst.norm()).item(),
                               out_dtype=str(o.dtype)[6:], state_dtype=str(st.dtype)[6:])
                    row["ok"] = chosen == "triton" and row["o_rel"] < (1e-4 if dtype == torch.float32 else 2e-2)
                except Exception as e:  # noqa: BLE001
                    row.update(error=f"{type(e).__name__}: {e}", ok=False)
                print(row, flush=True)
                rows.append(row)
    RESULT["api"] = rows
    return rows


# ---- sweep ---------------------------------------------------------------------------------------------------
SHAPES = [(4, 16, 8192, 128), (1, 16, 65536, 128)]
if DEV == "cpu":
    SHAPES = [(1, 2, 100, 32)]
CSHAPE = (2, 4, 1000, 128) if DEV != "cpu" else (1, 2, 70, 32)


def variants():
    base = {n: {k: v for k, v in spec.items() if k in ("BK", "BV")} for n, spec in L.TUNE.items()}
    for n, spec in base.items():       # the sweep's own base: 64-wide tiles everywhere
        spec.update({k: 64 for k in spec})

    def with_(warps, stages, state, big=False):
        t = copy.deepcopy(base)
        for name, spec in t.items():
            spec.update(num_warps=warps, num_stages=stages)
            if name in ("fwd_h", "bwd_dh"):
                spec.update(BK=state, BV=state)
        if big:
            t["fwd_o"].update(BV=128)
            t["bwd_dv"].update(BV=128)
            t["bwd_dqk"].update(BK=128)
            t["gla_inter"].update(BK=128)
        return t

    def sub(warps, bk):   # GLA's 16-row sub-chunk kernels want few warps; the rest as w4s2_s32
        t = with_(4, 2, 32)
        for name in ("gla_A", "gla_intra"):
            t[name].update(num_warps=warps, num_stages=2, BK=bk)
        return t

    return {"w4s2_s32": with_(4, 2, 32), "w8s3_s64": with_(8, 3, 64), "w8s2_s32_big": with_(8, 2, 32, big=True),
            "w4s3_s64": with_(4, 3, 64), "sub_w2_k64": sub(2, 64), "sub_w1_k32": sub(1, 32), "sub_w2_k128": sub(2, 128)}


def fwd_bwd(kind, q, k, v, g, scale, do):
    o, _ = L.chunk_decay(q, k, v, g, scale)
    o.backward(do)


def kernel_times(fn, iters=3):
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        name = e.key
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        for kname, tkey in KERNELS.items():
            if name.startswith(kname):
                out[tkey] = out.get(tkey, 0.0) + t / iters / 1000.0   # ms per call
    return out


def sub_variants():
    """Launch settings of GLA's sub-chunk kernels only, the rest as TUNE."""
    out = {"TUNE": copy.deepcopy(L.TUNE)}
    for warps_a, bk_a, warps_i, bk_i in ((4, 64, 4, 32), (2, 64, 2, 32)):
        t = copy.deepcopy(L.TUNE)
        t["gla_A"].update(num_warps=warps_a, BK=bk_a)
        t["gla_intra"].update(num_warps=warps_i, BK=bk_i)
        out[f"A_w{warps_a}k{bk_a}_intra_w{warps_i}k{bk_i}"] = t
    return out


@section("sweep")
def sweep(only_sub=False):
    table = {}
    all_variants = sub_variants() if only_sub else variants()
    for vname, tune in all_variants.items():
        L.TUNE = tune
        for (b, h, s, d) in SHAPES:
            for kind in (("dim",) if only_sub else ("scalar", "dim")):
                q, k, v, g = make(kind, "typical", b, h, s, d)
                leaves = [t.requires_grad_() for t in (q, k, v)]
                g = g.requires_grad_()
                do = torch.randn_like(v)
                try:
                    times = kernel_times(lambda: fwd_bwd(kind, *leaves, g, d ** -0.5, do))
                except Exception as e:  # noqa: BLE001
                    times = {"error": f"{type(e).__name__}: {e}"}
                table.setdefault(vname, {})[f"{kind}/B{b}H{h}S{s}"] = times
                print(vname, kind, (b, h, s), {n: round(t, 3) for n, t in times.items() if isinstance(t, float)},
                      flush=True)
        RESULT["sweep"] = table
        save()
    # per kernel: the variant with the least total time over shapes and gate kinds
    best = {}
    for key in set(KERNELS.values()):
        totals = {}
        for vname, per in table.items():
            ts = [t.get(key) for t in per.values() if isinstance(t, dict) and key in t]
            if ts and all(isinstance(x, float) for x in ts) and len(ts) == max(
                    len([1 for t in p.values() if isinstance(t, dict) and key in t]) for p in table.values()):
                totals[vname] = sum(ts)
        if totals:
            best[key] = min(totals, key=totals.get)
    vs = all_variants
    tune = copy.deepcopy(vs["TUNE"] if only_sub else vs["w4s2_s32"])
    for key, vname in best.items():
        tune[key] = copy.deepcopy(vs[vname][key])
    L.TUNE = tune
    RESULT["tune"] = {"chosen_variant_per_kernel": best, "TUNE": tune}
    print("chosen", best, flush=True)
    return tune


# ---- timing --------------------------------------------------------------------------------------------------
def bench(fn, grad_to_none=None, rep=200):
    from triton.testing import do_bench

    if DEV == "cpu":
        return events(fn, n=1)
    return do_bench(fn, warmup=50, rep=rep, grad_to_none=grad_to_none, return_mode="median")


def events(fn, n=3):
    if DEV == "cpu":
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1000
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]


@section("timing")
def timing(with_fla, with_torch):
    rows = []
    for (b, h, s, d) in SHAPES:
        for kind in ("scalar", "dim"):
            q, k, v, g = make(kind, "typical", b, h, s, d)
            scale = d ** -0.5
            do = torch.randn_like(v)
            row = {"op": "simple_gla (scalar gate)" if kind == "scalar" else "gla (per-dim gate)",
                   "shape": f"B{b} H{h} S{s} D{d}", "dtype": "bf16"}
            lv = [t.clone().requires_grad_() for t in (q, k, v)]
            lg = g.clone().requires_grad_()

            def ours_f():
                return L.chunk_decay(q, k, v, g, scale)

            def ours_fb():
                L.chunk_decay(*lv, lg, scale)[0].backward(do)

            row["ours_fwd_ms"] = bench(ours_f)
            row["ours_fwdbwd_ms"] = bench(ours_fb, grad_to_none=lv + [lg])
            if kind == "dim":   # the same through the public API (its checks of g included)
                attn = az.get("gla")
                row["ours_api_fwd_ms"] = bench(lambda: attn(q, k, v, causal=True, g=g, backend="triton"))
            if with_fla:
                try:
                    f = fla_fn(kind)
                    fq, fk, fv = (to_fla(t) for t in (q, k, v))
                    fg = fla_gate(g)
                    fdo = to_fla(do)
                    flv = [t.clone().requires_grad_() for t in (fq, fk, fv)]
                    flg = fg.clone().requires_grad_()
                    f(fq, fk, fv, fg, scale)   # autotune / compile outside the timing
                    row["fla_fwd_ms"] = bench(lambda: f(fq, fk, fv, fg, scale))
                    row["fwd_ratio_ours_over_fla"] = row["ours_fwd_ms"] / row["fla_fwd_ms"]
                    f(*flv, flg, scale).backward(fdo)
                    row["fla_fwdbwd_ms"] = bench(lambda: f(*flv, flg, scale).backward(fdo), grad_to_none=flv + [flg])
                    row["fwdbwd_ratio_ours_over_fla"] = row["ours_fwdbwd_ms"] / row["fla_fwdbwd_ms"]
                except Exception as e:  # noqa: BLE001
                    row["fla_error"] = f"{type(e).__name__}: {e}"
            if with_torch:
                state = torch.zeros(b, h, d, d, device=DEV)
                try:
                    row["torch_fwd_ms"] = events(lambda: decay_chunk(q, k, v, g, scale, state, 64), n=3)
                    if s <= 8192:
                        row["torch_fwdbwd_ms"] = events(
                            lambda: decay_chunk(*lv, lg, scale, state, 64)[0].backward(do.float()), n=3)
                except Exception as e:  # noqa: BLE001
                    row["torch_error"] = f"{type(e).__name__}: {e}"
            print({n: (round(x, 3) if isinstance(x, float) else x) for n, x in row.items()}, flush=True)
            rows.append(row)
            RESULT["timing"] = rows
            save()
            torch.cuda.empty_cache()
    return rows


# ---- feature-map variants: based and normalised linear ----------------------------------------------------------
def _fm_inputs(name, b, h, s, d, dv, dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    q, k = (torch.randn(b, h, s, d, device=DEV).to(dtype) for _ in range(2))
    return q, k, torch.randn(b, h, s, dv, device=DEV).to(dtype)


def _fla_fm(name):
    """fla's function for `name` on (B, H, S, D) tensors (its (B, S, H, D) layout inside), or None."""
    if name == "based_parallel":
        from fla.ops.based import parallel_based as f
    elif name == "based_fused_chunk":
        from fla.ops.based import fused_chunk_based as f
    else:
        from fla.ops.linear_attn import chunk_linear_attn

        def f(q, k, v, scale):
            return chunk_linear_attn(q, k, v, scale, normalize=True)[0]
        phi = lambda t: F.elu(t.float()).add(1).to(t.dtype)  # noqa: E731 - fla takes features, as a layer gives them
        return lambda q, k, v, scale: from_fla(f(to_fla(phi(q)), to_fla(phi(k)), to_fla(v), scale))
    return lambda q, k, v, scale: from_fla(f(to_fla(q), to_fla(k), to_fla(v), scale, use_norm=True))


FM = {"based": (16, ("based_parallel", "based_fused_chunk")), "linear": (128, ("linear_chunk",))}
PARALLEL_MAX_LEN = TB.PARALLEL_MAX_LEN


def based_sweep(rows, shape=(4, 16, 8192)):
    """Launch settings of the quadratic-form based kernels, each timed alone at B4 H16 S8192 D16 Dv128; TB.TUNE
    then takes the fastest per kernel (recorded as rows["based_tune"])."""
    import itertools

    b, h, s = shape
    q, k, v = _fm_inputs("based", b, h, s, 16, 128)
    scale = 0.25
    o, z = TB.based_fwd(q, k, v, scale, True)
    do = torch.randn_like(o)
    run = {"fwd": lambda: TB.based_fwd(q, k, v, scale, True),
           "dkdv": lambda: TB.based_bwd(q, k, v, o, z, do, scale, True),     # dkdv + dq: timed together, then dq
           "dq": lambda: TB.based_bwd(q, k, v, o, z, do, scale, True)}
    best = copy.deepcopy(TB.TUNE)
    found = {}
    for kern in ("fwd", "dkdv", "dq"):
        times = []
        for bm, bn, w, st in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3)):
            TB.TUNE = {**best, kern: dict(BM=bm, BN=bn, num_warps=w, num_stages=st)}
            try:
                run[kern]()
                times.append((bench(run[kern], rep=50), dict(BM=bm, BN=bn, num_warps=w, num_stages=st)))
            except Exception as e:  # noqa: BLE001 - a setting that does not compile (shared memory) is skipped
                times.append((float("inf"), {"error": f"{type(e).__name__}"[:80], "BM": bm, "BN": bn}))
        times.sort(key=lambda t: t[0])
        best[kern] = times[0][1]
        found[kern] = [(round(t, 4), c) for t, c in times[:5]]
        print("based sweep", kern, found[kern][:3], flush=True)
    TB.TUNE = best
    rows["based_tune"] = {"TUNE": best, "top5": found}


def based_crossover(rows):
    """`based` at B1 H16 D16 Dv128: the quadratic-form kernels against the chunk kernels by length (where the
    default PARALLEL_MAX_LEN comes from)."""
    attn = az.get("based")
    out = []
    for s in ((256,) if DEV == "cpu" else (4096, 8192, 16384, 32768, 65536)):
        q, k, v = _fm_inputs("based", 1, 16, s, 16, 128)
        do = torch.randn_like(v)
        lv = [t.clone().requires_grad_() for t in (q, k, v)]
        row = {"S": s}
        for path, limit in (("quadratic", 1 << 30), ("chunk", 0)):
            TB.PARALLEL_MAX_LEN = limit
            try:
                row[f"{path}_fwd_ms"] = bench(lambda: attn(q, k, v, causal=True, backend="triton"), rep=50)
                row[f"{path}_fwdbwd_ms"] = bench(lambda: attn(*lv, causal=True, backend="triton").backward(do),
                                                 grad_to_none=lv, rep=50)
            except Exception as e:  # noqa: BLE001
                row[f"{path}_error"] = f"{type(e).__name__}: {e}"[:300]
        TB.PARALLEL_MAX_LEN = PARALLEL_MAX_LEN
        print("based crossover", row, flush=True)
        out.append(row)
    rows["based_crossover"] = out


@section("feature_maps")
def feature_maps(with_fla, sweep_based=False, only_correctness=False):
    rows = {"correctness": [], "timing": []}
    RESULT["feature_maps"] = rows
    b, h, s, _ = CSHAPE
    for name, (d, fla_names) in list(FM.items()) + [("based_chunk", (16, ()))]:
        # based_chunk: `based` through the chunk kernels (Taylor features) instead of the quadratic-form ones
        TB.PARALLEL_MAX_LEN = 0 if name == "based_chunk" else PARALLEL_MAX_LEN
        name = name.replace("_chunk", "") if name == "based_chunk" else name
        attn = az.get(name)
        q, k, v = _fm_inputs(name, b, h, s, d, 128)
        scale = d ** -0.5
        do = torch.randn_like(v)
        lf = [t.double().requires_grad_() for t in (q, k, v)]
        ref = attn(*lf, causal=True, backend="torch")            # float64 chunk form (== definition: tests)
        ref_g = torch.autograd.grad(ref, lf, do.double())
        row = {"variant": name, "shape": f"B{b} H{h} S{s} Dqk{d} Dv128"}
        for impl in ["ours", "torch_bf16"] + ([f"fla.{n}" for n in fla_names] if with_fla else []):
            try:
                leaves = [t.clone().requires_grad_() for t in (q, k, v)]
                if impl == "ours":
                    o = attn(*leaves, causal=True, backend="triton")
                elif impl == "torch_bf16":
                    o = _bf16_chunk(attn, *leaves, scale)
                else:
                    o = _fla_fm(impl[4:])(*leaves, scale)
                got = torch.autograd.grad(o, leaves, do)
                row[impl] = errs(o, list(got) + [None], ref, list(ref_g) + [None])
            except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                row[impl] = f"{type(e).__name__}: {e}"[:300]
        if isinstance(row.get("ours"), dict) and isinstance(row.get("torch_bf16"), dict):
            row["ok"] = all(row["ours"][n][0] <= 2 * row["torch_bf16"][n][0] for n in row["ours"])
        print(name, {n: ({m: f"{x[0]:.1e}" for m, x in r.items()} if isinstance(r, dict) else r)
                     for n, r in row.items() if n not in ("variant", "shape")}, flush=True)
        row["path"] = "chunk" if TB.PARALLEL_MAX_LEN == 0 else "default"
        rows["correctness"].append(row)
        save()
    TB.PARALLEL_MAX_LEN = PARALLEL_MAX_LEN
    if only_correctness:
        return rows
    if DEV != "cpu" and sweep_based:
        based_sweep(rows)
    based_crossover(rows)
    for (b, h, s, _) in SHAPES:
        for name, (d, fla_names) in FM.items():
            attn = az.get(name)
            q, k, v = _fm_inputs(name, b, h, s, d, 128)
            scale = d ** -0.5
            do = torch.randn_like(v)
            row = {"variant": name, "shape": f"B{b} H{h} S{s} Dqk{d} Dv128", "dtype": "bf16"}
            lv = [t.clone().requires_grad_() for t in (q, k, v)]
            try:
                row["ours_fwd_ms"] = bench(lambda: attn(q, k, v, causal=True, backend="triton"))
                row["ours_fwdbwd_ms"] = bench(lambda: attn(*lv, causal=True, backend="triton").backward(do),
                                              grad_to_none=lv)
            except Exception as e:  # noqa: BLE001
                row["ours_error"] = f"{type(e).__name__}: {e}"[:300]
            for fname in (fla_names if with_fla else ()):
                try:
                    f = _fla_fm(fname)
                    f(q, k, v, scale)
                    row[f"{fname}_fwd_ms"] = bench(lambda: f(q, k, v, scale))
                    f(*lv, scale).backward(do)
                    row[f"{fname}_fwdbwd_ms"] = bench(lambda: f(*lv, scale).backward(do), grad_to_none=lv)
                    row[f"fwd_ratio_ours_over_{fname}"] = row["ours_fwd_ms"] / row[f"{fname}_fwd_ms"]
                    row[f"fwdbwd_ratio_ours_over_{fname}"] = row["ours_fwdbwd_ms"] / row[f"{fname}_fwdbwd_ms"]
                except Exception as e:  # noqa: BLE001
                    row[f"{fname}_error"] = f"{type(e).__name__}: {e}"[:300]
                torch.cuda.empty_cache() if DEV != "cpu" else None
            print({n: (round(x, 3) if isinstance(x, float) else x) for n, x in row.items()}, flush=True)
            rows["timing"].append(row)
            save()
    return rows


def _bf16_chunk(attn, q, k, v, scale):
    """FlashAttention's baseline: the torch chunk path on the kernels' operands in bf16 arithmetic (state too)."""
    from attnzoo.variants.linear._decay import normalise, with_ones

    shapes = types.SimpleNamespace(batch=k.shape[0], kv_heads=k.shape[1], sk=k.shape[2])
    ns = types.SimpleNamespace(shapes=shapes, inputs={}, scale=scale)
    op = L._operands(attn, q, k, v, ns)
    vv = with_ones(op.v) if op.norm else op.v
    state = torch.zeros(k.shape[0], k.shape[1], op.k.shape[-1], vv.shape[-1], dtype=q.dtype, device=q.device)
    o = decay_chunk(op.q, op.k, vv, op.g, op.scale, state, 64)[0]
    return normalise(o) if op.norm else o


def prune_fla_autotune():
    """Keep fla's autotune configs with 4 or 8 warps, 2 or 3 stages and 64-wide tiles (where it has them)."""
    import importlib

    from triton.runtime.autotuner import Autotuner

    for name in ("fla.ops.simple_gla.chunk", "fla.ops.gla.chunk", "fla.ops.common.chunk_h", "fla.ops.common.chunk_o",
                 "fla.ops.utils.cumsum"):
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001
            print("fla import", name, e, flush=True)
    n_before = n_after = 0
    for mod in list(sys.modules.values()):
        if not getattr(mod, "__name__", "").startswith("fla.ops"):
            continue
        for obj in list(vars(mod).values()):
            tuner = obj
            while tuner is not None and not isinstance(tuner, Autotuner):
                tuner = getattr(tuner, "fn", None)
            if tuner is None or getattr(tuner, "_pruned_by_bench", False):
                continue
            cfgs = tuner.configs
            keep = [c for c in cfgs if c.num_warps in (4, 8) and c.num_stages in (2, 3)
                    and all(v == 64 for kk, v in c.kwargs.items() if kk in ("BK", "BV"))]
            if not keep:
                keep = [c for c in cfgs if c.num_warps in (4, 8) and c.num_stages in (2, 3)] or cfgs[:2]
            n_before += len(cfgs)
            n_after += len(keep)
            tuner.configs = keep
            tuner._pruned_by_bench = True
    RESULT["fla_autotune_configs"] = {"before": n_before, "after": n_after}
    # fla 0.6.0 refuses its gated chunk_bwd_dqkwg (chunk_simple_gla's backward with g) on Hopper with
    # 3.4 <= Triton < 3.7.1 ("produces incorrect results", fla #640); the device has Triton 3.6. We lift the
    # guard to time it and measure its error (correctness_fla), and say so in the results.
    import fla.ops.common.chunk_o as chunk_o

    if not getattr(chunk_o, "TRITON_ABOVE_3_7_1", True):
        chunk_o.TRITON_ABOVE_3_7_1 = True
        RESULT["fla_note"] = ("fla refuses chunk_simple_gla's gated backward on Hopper with Triton 3.4-3.7.0 "
                              "(fla #640, 'produces incorrect results'); the guard was lifted to time it and to "
                              "measure its error (see correctness[*].fla)")
    print("fla autotune configs", n_before, "->", n_after, flush=True)


def main():
    global OUT, CSHAPE
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--sweep-sub", action="store_true", help="sweep GLA's sub-chunk kernels only (rest: TUNE)")
    ap.add_argument("--no-fla", action="store_true")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--tune", default=None, help="a JSON TUNE table to use instead of the sweep")
    ap.add_argument("--feature-maps", action="store_true", help="also run the based / normalised linear section")
    ap.add_argument("--only-feature-maps", action="store_true", help="run that section only")
    ap.add_argument("--sweep-based", action="store_true", help="sweep the quadratic-form based kernels' settings")
    ap.add_argument("--fa-shape", default=None,
                    help="B,H,S,D: only FlashAttention's rule (all gate regimes, based, normalised linear) at this shape, "
                         "e.g. 1,4,65536,128")
    args = ap.parse_args()
    OUT = args.out
    import triton

    props = torch.cuda.get_device_properties(0) if DEV != "cpu" else None
    RESULT.update(device=getattr(props, "name", "cpu (interpreter)"), sms=getattr(props, "multi_processor_count", 0),
                  torch=torch.__version__,
                  triton=triton.__version__, python=platform.python_version(), chunk=L.CHUNK)
    with_fla = not args.no_fla
    if with_fla:
        try:
            import fla
            prune_fla_autotune()
            RESULT["fla"] = getattr(fla, "__version__", "?")
        except Exception as e:  # noqa: BLE001
            RESULT["fla_error"] = f"{type(e).__name__}: {e}"
            with_fla = False
    save()
    if args.fa_shape:
        CSHAPE = tuple(int(x) for x in args.fa_shape.split(","))
        RESULT["fa_shape"] = list(CSHAPE)
        correctness(True)
        feature_maps(with_fla, only_correctness=True)
        save()
        return
    if args.only_feature_maps:
        feature_maps(with_fla, sweep_based=args.sweep_based)
        save()
        return
    correctness(args.quick)
    if args.tune:
        L.TUNE = json.load(open(args.tune))
        RESULT["tune"] = {"from": args.tune, "TUNE": L.TUNE}
    elif not args.no_sweep:
        sweep(only_sub=args.sweep_sub)
    timing(with_fla, not args.no_torch)
    if with_fla:
        correctness_fla()
    api_checks()
    if args.feature_maps:
        feature_maps(with_fla)
    if "tune" in RESULT:   # the rule again under the launch settings the timing used
        correctness(True, key="correctness_final_tune")
    save()
    print("\n== summary")
    for r in RESULT.get("correctness_final_tune", RESULT.get("correctness", [])):
        pairs = ", ".join(f"{n} {r['ours'][n][0]:.1e}/{r['torch_bf16'][n][0]:.1e}" for n in r["ours"]
                          if isinstance(r["ours"][n], list))
        print(f"{r['kind']:7s} {r['regime']:8s} {'ok' if r['ok'] else 'FAIL'}  ours/torch-bf16 max err: {pairs}")
    print(f"{'op':26s} {'shape':20s} {'ours fwd':>9s} {'fla fwd':>9s} {'ratio':>6s} {'ours f+b':>9s} "
          f"{'fla f+b':>9s} {'ratio':>6s} {'torch fwd':>9s}")
    for r in RESULT.get("timing", []):
        g = lambda n: r.get(n, float("nan"))  # noqa: E731
        print(f"{r['op']:26s} {r['shape']:20s} {g('ours_fwd_ms'):9.3f} {g('fla_fwd_ms'):9.3f} "
              f"{g('fwd_ratio_ours_over_fla'):6.2f} {g('ours_fwdbwd_ms'):9.3f} {g('fla_fwdbwd_ms'):9.3f} "
              f"{g('fwdbwd_ratio_ours_over_fla'):6.2f} {g('torch_fwd_ms'):9.2f}")
    print("elapsed", round(time.time() - T0, 1), "s; errors:", list(RESULT.get("errors", {})))


if __name__ == "__main__":
    main()
