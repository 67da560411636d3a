"""Every Triton kernel compiles for sm_90 (H100/H200) without register spills, checked on a CPU-only machine.

The CPU tests run the kernels under the interpreter, which accepts things the GPU compiler rejects; this
catches those, and spills in the configurations the launchers pick, before a GPU session is spent on them.
"""

import pytest

from fastpref.testing import compile_for_gpu, ptxas_available

pytestmark = pytest.mark.skipif(not ptxas_available(), reason="the triton wheel has no ptxas")

STATS_OUT = {"OUT_M": "*fp32", "OUT_S": "*fp32", "OUT_T": "*fp32", "OUT_ZT": "*fp32"}


@pytest.mark.parametrize("dtype,softcap", [("bf16", False), ("fp16", False), ("fp32", False), ("bf16", True)])
def test_logprobs_fused_forward(dtype, softcap):
    res = compile_for_gpu(
        "fastpref.kernels.logprobs", "_fused_fwd_kernel",
        {"H": f"*{dtype}", "W": f"*{dtype}", "B": f"*{dtype}", "TGT": "*i64", **STATS_OUT, "N": "i32", "V": "i32",
         "D": "i32", "stride_h": "i32", "stride_w": "i32", "z_mul": "fp32", "cap_mul": "fp32", "v_per_split": "i32"},
        {"HAS_BIAS": True, "SOFTCAP": softcap, "DOT_FP32": dtype == "fp32", "BLOCK_N": 64, "BLOCK_V": 128,
         "BLOCK_D": 32 if dtype == "fp32" else 64},  # as the launcher picks
        num_warps=8, num_stages=2 if dtype == "fp32" else 3)
    assert res["stack"] == 0, f"register spills: {res}"
    if dtype != "fp32":
        assert res["wgmma"], "the bf16/fp16 dot should use Hopper's wgmma"


@pytest.mark.parametrize("ent,softcap", [(False, False), (True, False), (True, True)])
def test_logprobs_row_kernels(ent, softcap):
    res = compile_for_gpu("fastpref.kernels.logprobs", "_rows_grad_kernel",
                          {"Z": "*bf16", "TGT": "*i64", "LSE": "*fp32", "G": "*fp32", "GE": "*fp32", "ENT": "*fp32",
                           "V": "i32", "stride_z": "i32", "z_mul": "fp32", "cap_mul": "fp32"},
                          {"SOFTCAP": softcap, "HAS_ENT_GRAD": ent, "BLOCK_V": 2048}, num_warps=8)
    assert res["stack"] == 0, res
    res = compile_for_gpu("fastpref.kernels.logprobs", "_rows_stats_kernel",
                          {"Z": "*bf16", "TGT": "*i64", **STATS_OUT, "R": "i32", "V": "i32", "stride_z": "i32",
                           "z_mul": "fp32", "cap_mul": "fp32"},
                          {"SOFTCAP": softcap, "BLOCK_R": 4, "BLOCK_V": 1024}, num_warps=4)
    assert res["stack"] == 0, res
