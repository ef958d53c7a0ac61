"""The kernels compile for the H100 (sm_90) with the real Triton compiler, even on a CPU machine.

The interpreter runs kernels as Python and accepts code the compiler rejects, so the CPU suite
also lowers every kernel to PTX/cubin for sm_90 (no GPU needed) and checks that the streaming
loads are 16-byte vector loads.  It runs in a subprocess because this test session decorated the
kernels for the interpreter.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = r'''
import json, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sail.kernels import _triton_rows as rows, _dpo_loss_triton as dpo, _rank_reward_triton as rank

def lower(fn, sig, constexprs, aligned):
    # aligned: arguments the launcher specialises as multiples of 16 (pointers, D = 16384, ...)
    attrs = {(list(sig).index(n),): [["tt.divisibility", 16]] for n in aligned}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    return sorted(set(re.findall(r"ld\.global[\w:.]*", k.asm["ptx"])))

out = {}
for dt in ("bf16", "fp32"):
    sig = dict(p_ptr="*" + dt, r_ptr="*" + dt, t_ptr="*" + dt, out_ptr="*fp32", rows="i32",
               n_cols="i32", chunk_len="i32", n_chunks="i32", t_group="i32", t_period="i32",
               BLOCK="constexpr", WITH_ERRORS="constexpr")
    out["partials_" + dt] = lower(rows._stable_diff_partials_kernel, sig,
                                  dict(BLOCK=1024, WITH_ERRORS=True),
                                  ["p_ptr", "r_ptr", "t_ptr", "n_cols", "chunk_len"])
    sig = dict(p_ptr="*" + dt, t_ptr="*" + dt, coef_ptr="*fp32", gout_ptr="*fp32", grad_ptr="*" + dt,
               n_cols="i32", chunk_len="i32", n_chunks="i32", t_group="i32", t_period="i32",
               n_programs="i32", BLOCK="constexpr")
    out["grad_" + dt] = lower(dpo._dpo_grad_kernel, sig, dict(BLOCK=1024),
                              ["p_ptr", "t_ptr", "grad_ptr", "n_cols", "chunk_len"])
sig = dict(part_ptr="*fp32", z_ptr="*fp32", model_err_ptr="*fp32", ref_err_ptr="*fp32", worse_ptr="*fp32",
           coef_ptr="*fp32", loss_ptr="*fp32", pairs="i32", n_chunks="i32", inv_d="fp32",
           half_beta="fp32", sft_weight="fp32", hinge_weight="fp32", BLOCK_P="constexpr", BLOCK_C="constexpr",
           HAS_SFT="constexpr", HAS_HINGE="constexpr", HAS_SWITCH="constexpr", HAS_DPO="constexpr")
for name, sft, hinge, switch, has_dpo in (("", False, False, False, True), ("_terms", True, True, False, True),
                                          ("_sspo", True, False, True, True), ("_sft_only", True, False, False, False)):
    out["dpo_finalize" + name] = lower(      # plain DPO; both winner-preserving terms; SSPO's switch; SFT alone
        dpo._dpo_finalize_kernel, sig, dict(BLOCK_P=128, BLOCK_C=8, HAS_SFT=sft, HAS_HINGE=hinge,
                                            HAS_SWITCH=switch, HAS_DPO=has_dpo), [])
sig = dict(part_ptr="*fp32", per_draw_ptr="*fp32", reward_ptr="*fp32", n_groups="i32", K="i32",
           n_chunks="i32", scale="fp32", BLOCK_G="constexpr", BLOCK_K="constexpr", BLOCK_C="constexpr")
out["rank_finalize"] = lower(rank._rank_finalize_kernel, sig, dict(BLOCK_G=8, BLOCK_K=16, BLOCK_C=8), [])
print(json.dumps(out))
'''


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests compile the kernels")
def test_kernels_lower_to_sm90_with_vector_loads():
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no ahead-of-time compile API")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loads = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(loads) >= {"dpo_finalize", "dpo_finalize_terms", "dpo_finalize_sspo", "dpo_finalize_sft_only",
                          "rank_finalize"}
    for name, kinds in loads.items():
        if name.startswith(("partials_", "grad_")):
            # Every streaming load is a 16-byte vector load (v4.b32) on aligned rows.
            streaming = [k for k in kinds if k.endswith(".v4.b32")]
            assert streaming, f"{name}: no 16-byte vector loads in {kinds}"
            assert all(k.endswith((".v4.b32", "ld.global.b32")) for k in kinds), f"{name}: {kinds}"
