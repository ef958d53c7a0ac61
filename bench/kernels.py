"""Benchmark of the fused DPO loss and ranking reward: PyTorch eager vs torch.compile vs Triton.

    python -m sail.bench.kernels                      # GPU: full grid; CPU: --quick grid
    TRITON_INTERPRET=1 python -m sail.bench.kernels   # CPU, adds the Triton interpreter column
    python -m sail.bench.kernels --rows 64 256 --lengths 65536 --dtypes bf16 --ops dpo_fwdbwd

The baseline is the PyTorch reference of each kernel module (``dpo_loss_reference``,
``rank_reward_reference``), eager and through ``torch.compile``.

Byte model (the minimum traffic any implementation must move; GB/s = these bytes / time):
  dpo fwd       reads p_theta [R, D] and p_ref [R, D] once, the target once: [R, D], or [R/2, D]
                when shared by a pair.  Outputs (a few floats per row) are not counted.
  dpo fwd+bwd   the forward bytes + the gradient [R, D] written once (p_theta and the target are
                counted once even though an implementation re-reads them in backward).
  rank          reads cur and ref [P*N*K, D] once, the target once: [P*K, D] when shared by the
                N candidates of a prompt, else [P*N*K, D].
  noise         x_t = a x0 + b eps and the v-prediction target v = a eps - b x0 (a, b per row):
                reads x0, eps [R, D] once, writes x_t, v [R, D] once.  Measured (eager, compile)
                to size what fusing the noising / target into the loss kernels could save at
                most (bench/README.md); it has no Triton column.
all in the input dtype.  "% copy" divides the GB/s by the bandwidth of a large device copy
measured in the same run (bench.common.copy_bandwidth_gbps).

The last stdout line is a JSON summary; every measurement is appended as one JSON row to
``--out`` (default bench/results/kernels.jsonl).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

from sail.bench.common import Timer, copy_bandwidth_gbps, environment, median
from sail.kernels.dpo_loss import dpo_loss_reference, dpo_loss_triton
from sail.kernels.rank_reward import rank_reward_reference, rank_reward_triton

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OPS = ("dpo_fwd", "dpo_fwdbwd", "rank", "noise")
FULL = dict(rows=[2, 8, 64, 256], lengths=[16384, 65536], dtypes=["bf16", "fp32"])
# CPU default: a reduced grid, the cold torch.compile of every case takes tens of seconds on CPU.
QUICK = dict(rows=[8], lengths=[16384], dtypes=["bf16", "fp32"])
DPO_BETA = 5000.0


@dataclass(frozen=True)
class Case:
    op: str            # dpo_fwd | dpo_fwdbwd | rank
    rows: int          # prediction rows: 2P for DPO, P*N*K for rank, R for noise
    length: int        # D, elements per row
    dtype: str
    target: str        # shared | per-sample
    pnk: tuple = ()    # (P, N, K) for rank

    def row_shape(self) -> tuple:
        """Latent-shaped rows (4 x h x h, as SD 1.5 at 16384 and SDXL at 65536) when possible."""
        h = int(round((self.length // 4) ** 0.5))
        return (4, h, h) if 4 * h * h == self.length else (self.length,)

    def min_bytes(self) -> int:
        """See the byte model in the module docstring."""
        es = torch.empty((), dtype=DTYPES[self.dtype]).element_size()
        if self.op == "noise":
            return 4 * self.rows * self.length * es
        if self.op == "rank":
            P, N, K = self.pnk
            t_rows = P * K if self.target == "shared" else self.rows
        else:
            t_rows = self.rows // 2 if self.target == "shared" else self.rows
        grad_rows = self.rows if self.op == "dpo_fwdbwd" else 0
        return (2 * self.rows + t_rows + grad_rows) * self.length * es


def noise_reference(x0: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """x_t = a x0 + b eps and v = a eps - b x0, a and b [R] broadcast over each row."""
    a = a.view(-1, *([1] * (x0.dim() - 1)))
    b = b.view(-1, *([1] * (x0.dim() - 1)))
    return a * x0 + b * eps, a * eps - b * x0


def make_inputs(case: Case, device: torch.device):
    """Policy = target + noise, reference = policy + small noise, rounded to the case dtype."""
    g = torch.Generator(device=device).manual_seed(0)
    dt, S = DTYPES[case.dtype], case.row_shape()
    if case.op == "noise":
        alpha_bar = torch.rand(case.rows, generator=g, device=device)
        x0, eps = (torch.randn((case.rows, *S), generator=g, device=device).to(dt) for _ in range(2))
        return x0, eps, alpha_bar.sqrt().to(dt), (1 - alpha_bar).sqrt().to(dt)
    if case.op == "rank":
        P, N, K = case.pnk
        lead, t_lead = (P, N, K), ((P, K) if case.target == "shared" else (P, N, K))
    else:
        lead, t_lead = (case.rows,), ((case.rows // 2,) if case.target == "shared" else (case.rows,))
    t = torch.randn((*t_lead, *S), generator=g, device=device)
    t_full = t.unsqueeze(1).expand(*lead, *S) if case.op == "rank" and case.target == "shared" else (
        torch.cat([t, t]) if t.shape[0] != lead[0] else t)
    p = t_full + 0.5 * torch.randn(t_full.shape, generator=g, device=device)
    r = p + 0.05 * torch.randn(t_full.shape, generator=g, device=device)
    return p.to(dt).contiguous(), r.to(dt).contiguous(), t.to(dt).contiguous()


def make_step(case: Case, fn, inputs):
    """Zero-argument callable running the op once: forward under no_grad, or forward and the
    gradient w.r.t. the model prediction."""
    if case.op == "noise":
        return lambda: fn(*inputs)
    p, r, t = inputs
    if case.op == "rank":
        return lambda: fn(p, r, t, 1.0)
    if case.op == "dpo_fwd":
        def fwd():
            with torch.no_grad():
                return fn(p, r, t, DPO_BETA)
        return fwd
    p_grad = p.detach().requires_grad_()
    return lambda: torch.autograd.grad(fn(p_grad, r, t, DPO_BETA).loss, p_grad)


def implementations(case: Case, device: torch.device) -> dict:
    """name -> callable with the public signature.  Triton runs on CUDA, or on CPU only under
    TRITON_INTERPRET=1 where it is labelled triton-interpreter (correctness, not speed)."""
    reference = {"rank": rank_reward_reference, "noise": noise_reference}.get(case.op, dpo_loss_reference)
    fused = rank_reward_triton if case.op == "rank" else dpo_loss_triton
    impls = {"eager": reference}
    # A fresh dynamo cache per case: every case gets its own static-shape graph.
    torch._dynamo.reset()
    impls["compile"] = torch.compile(reference, dynamic=False)
    if case.op == "noise":
        return impls
    if device.type == "cuda":
        impls["triton"] = fused
    elif os.environ.get("TRITON_INTERPRET") == "1":
        impls["triton-interpreter"] = fused
    return impls


def peak_extra_bytes(step, device: torch.device):
    """Peak allocated bytes above what was allocated before the call (inputs excluded; the
    returned gradient included).  CPU: not measured (None)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = step()
    torch.cuda.synchronize(device)
    del out
    return torch.cuda.max_memory_allocated(device) - before


def measure(case: Case, name: str, fn, inputs, device, args, copy_gbps: float) -> dict:
    """One result row: timings, GB/s, % of copy bandwidth, peak memory, or the error string."""
    interp = name == "triton-interpreter"
    row = {"impl": name, "error": None}
    step = make_step(case, fn, inputs)
    try:
        t0 = time.perf_counter()
        step()                                    # compiles (torch.compile / Triton JIT)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        row["first_call_s"] = round(time.perf_counter() - t0, 3)
        repeats = min(args.repeats, 3) if interp else args.repeats
        times = Timer(device, repeats, warmup=0 if interp else args.warmup)(step)
        ms = median(times)
        # Interpreter timings measure Python, not the kernel: no bandwidth figures for them.
        gbps = None if interp else case.min_bytes() / (ms * 1e-3) / 1e9
        row.update(ms_median=ms, ms_min=min(times), ms_max=max(times), repeats=repeats,
                   GBps=gbps, pct_copy_bw=None if interp else 100.0 * gbps / copy_gbps,
                   peak_extra_bytes=peak_extra_bytes(step, device))
    except Exception as exc:  # noqa: BLE001 - a failing column is recorded, the run goes on
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    return row


def build_cases(args) -> list[Case]:
    cases = []
    for dtype in args.dtypes:
        for length in args.lengths:
            for op in args.ops:
                if op == "rank":
                    P, N, K = args.rank_pnk
                    cases.append(Case(op, P * N * K, length, dtype, args.target, (P, N, K)))
                    continue
                cases += [Case(op, rows, length, dtype, args.target) for rows in args.rows]
    return cases


def parse_args(argv, on_gpu: bool):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="reduced grid (default on CPU)")
    ap.add_argument("--full", action="store_true", help="full grid even on CPU")
    ap.add_argument("--rows", type=int, nargs="+", help="DPO rows 2P (even)")
    ap.add_argument("--lengths", type=int, nargs="+", help="elements per row")
    ap.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES))
    ap.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    ap.add_argument("--target", choices=["shared", "per-sample"], default="shared")
    ap.add_argument("--rank-pnk", type=int, nargs=3, metavar=("P", "N", "K"))
    ap.add_argument("--repeats", type=int, default=50 if on_gpu else 10)
    ap.add_argument("--warmup", type=int, default=10 if on_gpu else 1)
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads (CPU default 1: on a shared small machine OpenMP barriers "
                         "with busy neighbours make multi-threaded timings swing tenfold)")
    ap.add_argument("--out", default=os.path.join("bench", "results", "kernels.jsonl"))
    args = ap.parse_args(argv)
    quick = args.quick or not (on_gpu or args.full)
    grid = QUICK if quick else FULL
    args.rows = args.rows or grid["rows"]
    args.lengths = args.lengths or grid["lengths"]
    args.dtypes = args.dtypes or grid["dtypes"]
    args.rank_pnk = tuple(args.rank_pnk or ((2, 4, 4) if quick else (4, 8, 10)))
    args.grid = "quick" if quick else "full"
    if not on_gpu:
        torch.set_num_threads(args.threads or 1)
    if any(r % 2 or r <= 0 for r in args.rows):
        ap.error("--rows must be even and positive (DPO needs [winners; losers])")
    return args


def summarize(env: dict, copy_gbps: float, results: list[dict], args) -> dict:
    """Compact summary: ms and % copy per case and implementation, goals checked on GPU."""
    cases = {}
    for row in results:
        key = f"{row['op']} rows={row['rows']} D={row['length']} {row['dtype']}"
        entry = cases.setdefault(key, {"ms": {}, "pct_copy_bw": {}})
        entry["ms"][row["impl"]] = None if row["error"] else round(row["ms_median"], 4)
        pct = None if row["error"] else row["pct_copy_bw"]
        entry["pct_copy_bw"][row["impl"]] = None if pct is None else round(pct, 1)
    summary = {"bench": "kernels", "device": env["device"], "grid": args.grid,
               "copy_GBps": round(copy_gbps, 1), "rows_written": len(results), "out": args.out,
               "errors": sorted({f"{r['impl']}: {r['error']}" for r in results if r["error"]}),
               "cases": cases}
    if env["device_type"] == "cuda":
        summary["goals"] = gpu_goals(results)
    else:
        summary["goals"] = "not evaluated: CPU run (interpreter timings are not performance)"
    return summary


def gpu_goals(results: list[dict]) -> dict:
    """>= 85 % of copy bandwidth from 64 rows up; >= 1.5x torch.compile on forward+backward."""
    ok = [r for r in results if not r["error"]]
    pct = [r["pct_copy_bw"] for r in ok if r["impl"] == "triton" and r["op"] != "rank" and r["rows"] >= 64]
    by_case = {}
    for r in ok:
        if r["op"] == "dpo_fwdbwd":
            by_case.setdefault((r["rows"], r["length"], r["dtype"]), {})[r["impl"]] = r["ms_median"]
    speedups = [v["compile"] / v["triton"] for v in by_case.values() if "compile" in v and "triton" in v]
    return {"min_pct_copy_bw_rows_ge_64": min(pct, default=None),
            "min_speedup_vs_compile_fwdbwd": min(speedups, default=None),
            "pct_goal_met": bool(pct) and min(pct) >= 85.0,
            "speedup_goal_met": bool(speedups) and min(speedups) >= 1.5}


def print_row(case: Case, row: dict):
    if row["error"]:
        print(f"{case.op:10s} {case.rows:4d} x {case.length:6d} {case.dtype:4s} {row['impl']:18s} "
              f"ERROR {row['error'][:100]}", flush=True)
        return
    bw = ("(interpreter: no bandwidth)" if row["GBps"] is None
          else f"{row['GBps']:9.1f} GB/s {row['pct_copy_bw']:6.1f} %copy")
    print(f"{case.op:10s} {case.rows:4d} x {case.length:6d} {case.dtype:4s} {row['impl']:18s} "
          f"{row['ms_median']:10.4f} ms {bw}", flush=True)


def main(argv=None) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args = parse_args(argv, device.type == "cuda")
    env = environment(device)
    copy_gbps = copy_bandwidth_gbps(device)
    print(f"# {env['device']}  torch {env['torch']}  triton {env['triton']}  copy {copy_gbps:.1f} GB/s  "
          f"grid={args.grid}", flush=True)
    results = []
    for case in build_cases(args):
        inputs = make_inputs(case, device)
        for name, fn in implementations(case, device).items():
            row = {**asdict(case), "mode": "fwd+bwd" if case.op == "dpo_fwdbwd" else "fwd",
                   "min_bytes": case.min_bytes(), "copy_GBps": copy_gbps,
                   "timing": "cuda-events, L2 flushed" if device.type == "cuda" else "perf_counter",
                   "peak_extra_note": None if device.type == "cuda" else
                   "not measured on CPU: CPU tensor allocations are not tracked by torch",
                   **measure(case, name, fn, inputs, device, args, copy_gbps), "env": env}
            print_row(case, row)
            results.append(row)
        del inputs
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "a") as f:
        for row in results:
            f.write(json.dumps(row) + "\n")
    summary = summarize(env, copy_gbps, results, args)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
