"""The tolerance tables for float outputs of the kernels, per input dtype.

Why these numbers: every op here either copies values (gather/scatter: compared exactly) or
upcasts its inputs to fp32 and computes in fp32 exactly as the reference does (token_stats, the
k-means distances). The kernel and the reference then see the same fp32 numbers and differ only
in the order of the fp32 sums over channels (C <= a few thousand): a relative error of a few
fp32 ulps, far below what a low-precision computation would cost (the flash-attention rule,
"at most 2x the error of plain torch in that dtype", is looser than this table for fp16/bf16,
since torch in fp16 already errs by ~1e-3). So the table is the same fp32 bound for every
storage dtype; a kernel that computed in the storage dtype would fail it, which is the point.
The forecast ops store fp32 results in the caches' dtypes; with the reference's roundings (no
fused multiply-add) they are bit equal, and in the stored dtype this bound fails a one-ulp
difference on any value above about 1e-3 (a bf16 ulp is 2^-8 relative).
Indices, labels and staleness counts are compared exactly, never with a tolerance.
forecast_attention (a softmax, not one sum) has its own rule at the end of this file.
"""

import torch

TOL = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 1e-5, "atol": 1e-5},
    torch.bfloat16: {"rtol": 1e-5, "atol": 1e-5},
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, input_dtype: torch.dtype) -> None:
    torch.testing.assert_close(actual.cpu(), expected.cpu(), **TOL[input_dtype], equal_nan=True)


# forecast_attention: a softmax and two products, so a kernel differs from the reference by more
# than the order of one sum (online-softmax rescaling, exp2, blocked GEMMs, and in the Triton
# kernel 16-bit probabilities in the P @ V product, as in flash attention), and a 16-bit output
# rounds once. Rule (flash-attention's tests): against an fp32 oracle computed from the same
# inputs, the kernel's largest error is at most twice that of plain torch in the same dtype (the
# unfused path: the forecast rows, torch.cat, SDPA) plus ATTENTION_ATOL[dtype]: half a unit in
# the last place at 1.0 for the 16-bit dtypes (outputs are averages of values of size ~1; a
# small case can let plain torch round luckily), and for fp32 the sum-order bound above.
ATTENTION_ATOL = {
    torch.float32: 1e-5,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}


def attention_errors(actual: torch.Tensor, oracle: torch.Tensor, plain: torch.Tensor) -> tuple[float, float]:
    """Largest absolute error of `actual` and of `plain` (torch in that dtype) against the fp32 oracle."""
    oracle = oracle.float().cpu()
    return (
        float((actual.float().cpu() - oracle).abs().max()),
        float((plain.float().cpu() - oracle).abs().max()),
    )


def assert_attention_close(
    actual: torch.Tensor, oracle: torch.Tensor, plain: torch.Tensor, dtype: torch.dtype
) -> None:
    err, plain_err = attention_errors(actual, oracle, plain)
    bound = 2 * plain_err + ATTENTION_ATOL[dtype]
    assert err <= bound, f"max error {err:.3g} > 2 x plain torch's {plain_err:.3g} + {ATTENTION_ATOL[dtype]:.3g}"
