"""The one tolerance table for float outputs of the kernels, per input dtype.

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
"""

import torch

TOL = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 1e-5, "atol": 1e-5},
    torch.bfloat16: {"rtol": 1e-5, "atol": 1e-5},
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, input_dtype: torch.dtype) -> None:
    torch.testing.assert_close(actual.cpu(), expected.cpu(), **TOL[input_dtype], equal_nan=True)
