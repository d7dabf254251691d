"""Context parallelism on GPUs: attnzoo.distributed against PyTorch's own context_parallel and one GPU.

    NCCL_NVLS_ENABLE=0 torchrun --nproc_per_node 2 benchmarks/gpu_context_parallel.py --out cp.json
    python benchmarks/gpu_context_parallel.py --simulate          # no GPU: the 8-rank / multi-host table

Launched by torchrun it
1. checks correctness at 8k tokens: every attnzoo strategy's output and gradients (bf16) against a float32
   reference, next to one GPU's bf16 error (FlashAttention's rule: ours <= 2x that);
2. times causal and sliding-window attention at 64k-512k total tokens (bf16, B=1, H=Hkv=16, D=128),
   forward and forward+backward (CUDA events, median), for attnzoo's ring (zigzag layout for causal,
   contiguous for the window: structure-aware, neighbours only), attnzoo's allgather, PyTorch's
   `torch.distributed.tensor.experimental.context_parallel` (SDPA flash, its head-tail load balancing)
   and the whole sequence on one GPU (each rank runs it alone, at once); per row: time, speedup and
   scaling efficiency against one GPU, peak memory per GPU, bytes each rank sent/received;
3. prints the simulated schedule and byte counts for 8 ranks and for 2 hosts x 8 (no GPUs needed).
Rows that fail (out of memory, an API that differs) are recorded with the error, never fatal; a time
budget (--budget-s) skips the remaining rows, recorded as such. JSON goes to --out after every row.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off on the lent machines
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import torch
import torch.distributed as dist
import torch.nn.functional as F

import attnzoo as az
from attnzoo.bench.speed import _one_call_ms
from attnzoo.distributed import communication_plan, context_parallel, shard

B, H, D = 1, 16, 128
WINDOW = 4096
DEVICE = "cuda"  # --smoke: "cpu" with gloo, tiny lengths: the same code paths as a quick check without GPUs


# ---- simulation (no GPUs) ------------------------------------------------------------------------


def simulate(seq_len: int = 2**20) -> list[dict]:
    """Schedule and bytes of the structure-aware ring for 8 ranks on one host and 16 ranks on 2 hosts."""
    ids = torch.arange(seq_len).div(seq_len // 8 + 12345, rounding_mode="floor").view(1, -1)  # 9 documents
    cases = [("causal", az.get("full"), "contiguous", {}), ("causal", az.get("full"), "zigzag", {}),
             (f"sliding_window {WINDOW}", az.get("sliding_window", window=WINDOW), "contiguous", {}),
             ("documents (9)", az.get("document"), "contiguous", {"document_ids": ids})]
    rows = []
    for world, per_host in ((8, 8), (16, 8)):
        for label, variant, layout, inputs in cases:
            p = communication_plan(variant, seq_len=seq_len, world=world, causal=True, heads=H, kv_heads=H,
                                   head_dim=D, layout=layout, ranks_per_host=per_host, **inputs)
            rows.append({"world": world, "ranks_per_host": per_host, "mask": label, "layout": layout,
                         "max_fwd_GB_per_rank": p["max_fwd_bytes"] / 1e9,
                         "plain_ring_fwd_GB_per_rank": p["max_plain_ring_fwd_bytes"] / 1e9,
                         "ratio_vs_ring": p["ratio_vs_ring"],
                         "allgather_fwd_GB_per_rank": max(r["allgather_fwd_bytes"] for r in p["ranks"]) / 1e9,
                         "ulysses_fwd_GB_per_rank": max(r["ulysses_fwd_bytes"] for r in p["ranks"]) / 1e9,
                         "inter_host_GB_p2p": p["inter_host_fwd_bytes"] / 1e9,
                         "inter_host_GB_relay": p["relay_inter_host_fwd_bytes"] / 1e9,
                         "inter_host_GB_plain_ring": p["plain_ring_inter_host_fwd_bytes"] / 1e9,
                         "work_imbalance": p["work_imbalance"],
                         "ring_steps_used": sum(1 for s in p["steps"] if s),
                         "receives_from": [r["receives_from"] for r in p["ranks"]]})
    return rows


def print_simulation(rows: list[dict]) -> None:
    print(f"\nsimulated: causal masks, {2**20} tokens, H={H}, D={D}, bf16; forward k/v bytes per rank (busiest), "
          "GB; inter-host GB summed over ranks")
    head = (f"{'ranks':>5} {'mask':<20} {'layout':<10} {'ours':>7} {'ring':>7} {'ratio':>6} {'allgath':>7} "
            f"{'ulysses':>7} {'xhost p2p':>9} {'relay':>7} {'ring':>7} {'imbal':>6} {'steps':>5}")
    print(head)
    for r in rows:
        world = f"{r['world']}" if r["world"] == r["ranks_per_host"] else f"{r['world'] // r['ranks_per_host']}x{r['ranks_per_host']}"
        print(f"{world:>5} {r['mask']:<20} {r['layout']:<10} {r['max_fwd_GB_per_rank']:7.2f} "
              f"{r['plain_ring_fwd_GB_per_rank']:7.2f} {r['ratio_vs_ring']:6.3f} {r['allgather_fwd_GB_per_rank']:7.2f} "
              f"{r['ulysses_fwd_GB_per_rank']:7.2f} {r['inter_host_GB_p2p']:9.2f} {r['inter_host_GB_relay']:7.2f} "
              f"{r['inter_host_GB_plain_ring']:7.2f} {r['work_imbalance']:6.2f} {r['ring_steps_used']:5d}")


# ---- the GPU run -------------------------------------------------------------------------------------


def timed(fn, reps: int) -> float:
    """Median milliseconds of `fn` over `reps` runs after one warm-up (CUDA events on GPU)."""
    fn()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return sorted(_one_call_ms(fn, torch.device(DEVICE)) for _ in range(reps))[reps // 2]


def peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 1e9 if DEVICE == "cuda" else 0.0


def reset_memory() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def make(s: int, seed: int = 0, grad: bool = False):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return [torch.randn(B, H, s, D, device=DEVICE, dtype=torch.bfloat16, generator=g).requires_grad_(grad)
            for _ in range(4)]


def one_gpu(mask: str, q, k, v):
    """The whole sequence on this GPU: SDPA flash for causal; attnzoo's flash window kernel for windows."""
    if mask == "causal":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if DEVICE != "cuda":
        return az.attention(q, k, v, variant="sliding_window", window=WINDOW, causal=True, backend="torch")
    from attnzoo.backends.distributed.kernels import FlashKernel
    from attnzoo.backends.distributed.problem import Problem
    from attnzoo.backends.distributed.strategies import _Tiles
    from attnzoo.backends.distributed.view import global_call

    attn = az.get("sliding_window", window=WINDOW)
    s = q.shape[2]
    problem = Problem(attn, global_call(attn, q, k, v, True, D ** -0.5, s, {}), [[(0, s)]], FlashKernel(WINDOW, 0))
    return _Tiles.apply(q, k, v, problem, ((0, s),), ((0, s),))


def variant_of(mask: str):
    return {"causal": ("full", {}), "window": ("sliding_window", {"window": WINDOW}), "document": ("document", {})}[mask]


def document_ids(s: int) -> torch.Tensor:
    """Three documents of uneven lengths (3/8, 1/8, 1/2 of the sequence): boundaries inside ranks' shards."""
    ids = torch.zeros(B, s, dtype=torch.long, device=DEVICE)
    ids[:, 3 * s // 8:] = 1
    ids[:, s // 2:] = 2
    return ids


def ours(mask: str, layout: str, q, k, v, world: int, rank: int):
    """(this rank's shards of q, k, v, a function running attnzoo on them); call it inside context_parallel."""
    name, params = variant_of(mask)
    local = [shard(x.detach(), dim=2, layout=layout, world=world, rank=rank).contiguous().requires_grad_(x.requires_grad)
             for x in (q, k, v)]
    if mask == "document":
        params = {"document_ids": shard(document_ids(q.shape[2]), dim=1, layout=layout, world=world, rank=rank)}
    return local, lambda: az.attention(*local, variant=name, causal=True, **params)


def check(world: int, rank: int, s: int = 8192) -> list[dict]:
    """bf16 errors against a float32 reference (SDPA math, masked), ours vs one GPU's (flash for the band masks;
    for documents, SDPA under the dense mask in bf16), per tile kernel (flash / triton on CUDA)."""
    rows = []
    for mask, strategy, layout, tiles in (
            ("causal", "ring", "zigzag", "auto"), ("causal", "ring", "contiguous", "auto"),
            ("causal", "allgather", "zigzag", "auto"), ("causal", "ulysses", "contiguous", "auto"),
            ("window", "ring", "contiguous", "auto"), ("window", "allgather", "contiguous", "auto"),
            ("causal", "ring", "zigzag", "triton"), ("window", "ring", "contiguous", "triton"),
            ("document", "ring", "contiguous", "auto"), ("document", "allgather", "zigzag", "auto")):
        row = {"mask": mask, "strategy": strategy, "layout": layout, "tile_kernel": tiles, "seq_len": s}
        try:
            q, k, v, dout = make(s, seed=1, grad=True)
            pos = torch.arange(s, device=DEVICE)
            allowed = pos.view(1, -1) <= pos.view(-1, 1)
            if mask == "window":
                allowed &= pos.view(1, -1) >= pos.view(-1, 1) - WINDOW
            if mask == "document":
                ids = document_ids(s)[0]
                allowed &= ids.view(1, -1) == ids.view(-1, 1)
            ref_in = [x.detach().float().requires_grad_() for x in (q, k, v)]
            ref = F.scaled_dot_product_attention(*ref_in, attn_mask=allowed)
            ref.backward(dout.float())
            single = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed) if mask == "document" else \
                one_gpu(mask, q, k, v)
            single.backward(dout)
            local, run = ours(mask, layout, q, k, v, world, rank)
            with context_parallel(strategy=strategy, layout=layout, tile_kernel=tiles):
                out = run()
                out.backward(shard(dout, dim=2, layout=layout, world=world, rank=rank))

            def err(a, b):
                return float((a.detach().float() - b.detach()).abs().max())

            pieces = [shard(x, dim=2, layout=layout, world=world, rank=rank) for x in (ref, *(r.grad for r in ref_in))]
            row.update({
                "out_err_ours": err(out, pieces[0]), "out_err_one_gpu": err(single, ref),
                **{f"d{n}_err_ours": err(x.grad, r) for n, x, r in zip("qkv", local, pieces[1:])},
                **{f"d{n}_err_one_gpu": err(x.grad, r.grad) for n, x, r in zip("qkv", (q, k, v), ref_in)}})
            row["within_2x_one_gpu"] = all(row[f"{t}_err_ours"] <= 2 * row[f"{t}_err_one_gpu"] + 1e-6
                                           for t in ("out", "dq", "dk", "dv"))
        except Exception as e:  # noqa: BLE001 - recorded, the run goes on
            row["error"] = f"{type(e).__name__}: {e}"[:500]
            row["traceback"] = traceback.format_exc()[-2000:]
        rows.append(row)
        reset_memory()
    return rows


_MESH = None


def torch_cp(mask: str, q, k, v, dout, world: int, backward: bool, reps: int):
    """PyTorch's context_parallel on the same shapes: (ms, its rotate method), or raises with the reason."""
    if mask != "causal":
        raise NotImplementedError("PyTorch's context_parallel shards SDPA, which takes no sliding-window mask "
                                  "(only is_causal or a dense attn_mask, S x S at these lengths); its Flex path "
                                  "needs a CP block mask built per shape: not compared")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import (
        context_parallel as torch_context_parallel,
    )
    from torch.nn.attention import SDPBackend, sdpa_kernel

    global _MESH
    _MESH = _MESH or init_device_mesh(DEVICE, (world,))
    mesh = _MESH
    bufs = [x.detach().clone() for x in (q, k, v, dout)]
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch_context_parallel(mesh, buffers=bufs,
                                                                          buffer_seq_dims=[2, 2, 2, 2]):
        cq, ck, cv, cd = bufs

        def step():
            for x in (cq, ck, cv):
                x.grad = None
            out = F.scaled_dot_product_attention(cq, ck, cv, is_causal=True)
            if backward:
                out.backward(cd)

        try:
            for x in (cq, ck, cv):
                x.requires_grad_(backward)
            ms = timed(step, reps)
        finally:  # it restores the buffers by resizing them, which tensors requiring grad refuse
            for x in (cq, ck, cv):
                x.requires_grad_(False)
                x.grad = None
    return ms


def time_row(s: int, mask: str, backward: bool, impl: str, world: int, rank: int, reps: int) -> dict:
    """This rank's measurement of one row: ms, peak memory, and for attnzoo the bytes it moved per call."""
    q, k, v, dout = make(s, grad=backward)
    mine = {}
    if impl == "torch_cp":
        for x in (q, k, v):
            x.requires_grad_(False)
        mine["ms"] = torch_cp(mask, q, k, v, dout, world, backward, reps)
        mine["rotate_method"] = "torch default (allgather of k/v), head-tail load balancing"
        # not counted by torch: its allgather brings every other rank's k and v once per forward
        mine["bytes_received_per_call_estimated"] = 2 * B * H * s * D * 2 * (world - 1) // world
    elif impl == "one_gpu":
        def step():
            for x in (q, k, v):
                x.grad = None
            o = one_gpu(mask, q, k, v)
            if backward:
                o.backward(dout)
        mine["ms"] = timed(step, reps)
    else:  # "ring", "allgather", or "<strategy>_triton": the same with the triton tile kernel
        strategy, _, tiles = impl.partition("_")
        layout = "zigzag" if mask == "causal" and strategy == "ring" else "contiguous"
        mine["layout"] = layout
        local, run = ours(mask, layout, q, k, v, world, rank)
        ldout = shard(dout, dim=2, layout=layout, world=world, rank=rank).contiguous()
        del q, k, v, dout  # this rank holds its shards only, as in training
        reset_memory()
        with context_parallel(strategy=strategy, layout=layout, tile_kernel=tiles or "auto") as cp:
            def step():
                for x in local:
                    x.grad = None
                o = run()
                if backward:
                    o.backward(ldout)
            mine["ms"] = timed(step, reps)
        mine["bytes_sent_per_call"] = cp.traffic.sent // (reps + 1)
        mine["bytes_received_per_call"] = cp.traffic.received // (reps + 1)
    mine["peak_mem_GB"] = peak_gb()
    return mine


def gather_rows(row: dict) -> list[dict]:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="cp.json")
    ap.add_argument("--lengths", default="65536,131072,262144,524288", help="total tokens, comma-separated")
    ap.add_argument("--budget-s", type=float, default=240.0, help="skip timed rows past this many seconds")
    ap.add_argument("--simulate", action="store_true", help="only print the simulated 8-rank / multi-host table")
    ap.add_argument("--check-only", action="store_true", help="the correctness check only (no timed rows)")
    ap.add_argument("--impls", default="one_gpu,ring,allgather,torch_cp",
                    help="timed implementations (also ring_triton: the ring with the triton tile kernel)")
    ap.add_argument("--masks", default="causal,window")
    ap.add_argument("--smoke", action="store_true", help="CPU and gloo at tiny lengths (checks the script, times nothing "
                                                         "meaningful)")
    args = ap.parse_args()
    global DEVICE, WINDOW
    if args.smoke:
        DEVICE, WINDOW = "cpu", 64
        args.lengths = "512,1024" if args.lengths == ap.get_default("lengths") else args.lengths
    if args.simulate or "RANK" not in os.environ:
        sim = simulate()
        print_simulation(sim)
        with open(args.out, "w") as f:
            json.dump({"simulation": sim}, f, indent=1)
        return
    t0 = time.time()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    sim = simulate() if rank == 0 else None  # CPU work; the others wait for it in the first collective
    if DEVICE == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo", timeout=datetime.timedelta(seconds=120))
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke)", "world": world,
              "torch": torch.__version__,
              "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"), "shape": {"B": B, "H": H, "Hkv": H, "D": D},
              "window": WINDOW, "dtype": "bfloat16", "simulation": sim, "check": [], "rows": []}

    def save():
        if rank == 0:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)

    if rank == 0:
        print_simulation(sim)
        print(f"\n{result['device']} x{world}, torch {torch.__version__}")
    checked = check(world, rank, 8192 if DEVICE == "cuda" else 256)
    result["check"] = [{"per_rank": gather_rows(c)} for c in checked]
    save()
    if rank == 0:
        for c in result["check"]:
            r0 = c["per_rank"][0]
            print("check", r0["mask"], r0["strategy"], r0["layout"], r0["tile_kernel"], "error" if "error" in r0 else
                  f"out {r0['out_err_ours']:.3g} (one GPU {r0['out_err_one_gpu']:.3g}) dq {r0['dq_err_ours']:.3g} "
                  f"(one GPU {r0['dq_err_one_gpu']:.3g}) dk {r0['dk_err_ours']:.3g} (one GPU {r0['dk_err_one_gpu']:.3g}) "
                  f"dv {r0['dv_err_ours']:.3g} (one GPU {r0['dv_err_one_gpu']:.3g}) within 2x: {r0['within_2x_one_gpu']}",
                  r0.get("error", ""))
    plans = []
    for s in ([] if args.check_only else [int(x) for x in args.lengths.split(",")]):
        for mask in args.masks.split(","):
            plans += [(s, mask, backward, impl) for backward in (False, True) for impl in args.impls.split(",")]
    single_ms = {}
    for s, mask, backward, impl in plans:
        over = torch.tensor([time.time() - t0 > args.budget_s], device=DEVICE)
        dist.broadcast(over, 0)  # one decision for all ranks
        row = {"seq_len": s, "mask": mask, "mode": "fwd+bwd" if backward else "fwd", "impl": impl}
        if bool(over):
            row["skipped"] = f"time budget of {args.budget_s:.0f} s spent"
            result["rows"].append(row)
            continue
        reps = 3 if s <= 131072 else 2
        reset_memory()
        try:
            mine = time_row(s, mask, backward, impl, world, rank, reps)
        except Exception as e:  # noqa: BLE001 - out of memory or an API that differs: recorded, the run goes on
            mine = {"error": f"{type(e).__name__}: {e}"[:500]}
        finally:
            reset_memory()
        per_rank = gather_rows(mine)
        row["per_rank"] = per_rank
        errors = [r.get("error") for r in per_rank if r.get("error")]
        if errors:
            row["error"] = errors[0]
        else:
            row["ms"] = max(r["ms"] for r in per_rank)  # the step ends when the slowest rank does
            row["peak_mem_GB_per_gpu"] = [round(r["peak_mem_GB"], 2) for r in per_rank]
            if impl == "one_gpu":
                single_ms[(s, mask, backward)] = row["ms"]
            base = single_ms.get((s, mask, backward))
            if base and impl != "one_gpu":
                row["speedup_vs_one_gpu"] = base / row["ms"]
                row["scaling_efficiency"] = base / row["ms"] / world
            if "bytes_received_per_call" in per_rank[0]:
                row["bytes_received_per_rank"] = [r["bytes_received_per_call"] for r in per_rank]
        result["rows"].append(row)
        save()
        if rank == 0:
            print(f"{s:>7} {mask:<7} {row['mode']:<8} {impl:<10} " + (
                f"error: {row['error'][:120]}" if "error" in row else
                f"{row['ms']:9.1f} ms  speedup {row.get('speedup_vs_one_gpu', float('nan')):5.2f}  "
                f"peak {max(row['peak_mem_GB_per_gpu']):6.1f} GB  "
                f"recv {max(row.get('bytes_received_per_rank', [0])) / 1e9:6.2f} GB"), flush=True)
    result["seconds"] = time.time() - t0
    save()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
