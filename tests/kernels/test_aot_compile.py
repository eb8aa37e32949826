"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 (no GPU needed), at the
SD3/Flux shapes (C = 64 output channels, head dim 64/128, N = 4096 tokens, 20 clusters; the
selection also at N = 16384, Flux at 2048x2048; the forecast of K/V and of the noise cache;
attention over forecast caches at head dims 64, 72 and 128), and
reports ptxas registers and spills (printed, and as junit properties); a kernel that spills
more than its SPILL_LIMITS entry fails.

The compiles run in one subprocess without TRITON_INTERPRET: under the interpreter (which the
conftest turns on without a GPU) the kernels are InterpretedFunction objects and cannot compile.
One for all cases, because importing triton and the kernels takes longer than most compiles; a
case that fails to compile is recorded there and fails its own test.
"""

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import traceback

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# Submodules by name: the package re-exports functions called token_stats and kmeans.
token_stats = importlib.import_module("cat_kernels.triton.token_stats")
gather_scatter = importlib.import_module("cat_kernels.triton.gather_scatter")
forecast = importlib.import_module("cat_kernels.triton.forecast")
kmeans = importlib.import_module("cat_kernels.triton.kmeans")
select = importlib.import_module("cat_kernels.triton.select")
attention = importlib.import_module("cat_kernels.triton.attention")

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _sig(kernel, types, constexprs):
    """Scalar args default to i32 (sizes and strides); constexprs are marked as such."""
    sig = {name: "i32" for name in kernel.arg_names}
    sig.update({name: t for name, t in types.items() if name in kernel.arg_names})
    sig.update({name: "constexpr" for name in constexprs})
    return sig


def _contiguous(ones, div16):
    """The launcher's specialisation for contiguous inputs: stride 1 becomes a constant and
    pointers and sizes divisible by 16 carry that hint (what enables vector loads)."""
    return {"ones": ones, "div16": div16}


_TS_BF16 = {"out_ptr": "*bf16", "anchor_ptr": "*bf16", "labels_ptr": "*i64", "d_ptr": "*fp32", "cmax_ptr": "*fp32"}
_TS_FP32 = dict(_TS_BF16, out_ptr="*fp32", anchor_ptr="*fp32")
_TS_CONST = {"BLOCK_N": token_stats.BLOCK_N, "BLOCK_C": token_stats._block_c(64)}
_TS_NW = token_stats._num_warps(token_stats._block_c(64))
_TS_CONTIG = _contiguous(["s_oc", "s_ac", "s_ln"], ["N", "C", "s_ob", "s_on", "s_ab", "s_an", "s_lb"])
_KM_TYPES = {"x_ptr": "*fp32", "cent_ptr": "*fp32", "labels_ptr": "*i64"}
_KM_CONST = {"BLOCK_N": kmeans.BLOCK_N, "BLOCK_F": kmeans._block_f(66)}
_SEL_TYPES = {
    "d_ptr": "*fp32", "score_ptr": "*fp32", "labels_ptr": "*i64", "stale_ptr": "*fp32",
    "idx_ptr": "*i64", "scratch_ptr": "*i32", "decay": "fp32",
}

_FC_KV = {
    name: "*bf16"
    for name in ("base_ptr", "slope_ptr", "out_ptr", "rows_ptr", "base2_ptr", "slope2_ptr", "out2_ptr", "rows2_ptr")
} | {"pos_ptr": "*i64", "w_ptr": "*fp32", "idt_ptr": "*fp32"}
# The noise cache: bf16 base/out, an fp32 slope, int32 pos; the second cache's pointers unused.
_FC_NOISE = _FC_KV | {"slope_ptr": "*fp32", "slope2_ptr": "*fp32", "pos_ptr": "*i32"}


def _fc_const(D, two):
    block_n, block_d = forecast._blocks(D)
    return {"TWO": two, "ROUND_BF16": False, "BLOCK_N": block_n, "BLOCK_D": block_d}


# What the launcher sees for contiguous caches and (B, K, H, D) new rows viewed as (B, H, K, D).
# (16-byte vector loads and stores of every stream, checked in the PTX.)
_FC_CONTIG = _contiguous(
    ["s_rd", "s_r2d", "s_pn", "s_wn", "s_tn"],
    ["N", "D", "s_rb", "s_rh", "s_rk", "s_r2b", "s_r2h", "s_r2k", "s_pb", "s_wb", "s_tb"],
)
_FC_OPTS = {"enable_fp_fusion": False}



def _fa(D, dtype="*bf16", slope="*fp32", spec=None, heads=None, xmask=False):
    """forecast_attention with the launcher's config: q, caches, extras and out of `dtype`, slopes
    of `slope` (None: plain reuse, no slopes), (B, H, N, D) caches (heads=None) or the views of
    (B, N, heads * D) ones, an extra_mask or none."""
    types = dict.fromkeys(("q_ptr", "kb_ptr", "vb_ptr", "kx_ptr", "vx_ptr", "o_ptr"), dtype)
    types |= {"ks_ptr": slope or dtype, "vs_ptr": slope or dtype, "w_ptr": "*fp32", "qk_scale": "fp32",
              "xm_ptr": "*u8" if xmask else "*fp32"}
    lowp = dtype != "*fp32"
    cfg = attention.config(D, lowp, {None: 0, "*fp32": 4}.get(slope, 2))
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    const = {"D": D, "S_CN": D * (heads or 1), "HAS_SLOPE": slope is not None, "HAS_XMASK": xmask, "LOWP": lowp,
             "INTERPRET": False, **cfg}
    opts = {"enable_fp_fusion": False, "num_stages": num_stages}
    return (attention._forecast_attention_kernel, types, const, num_warps, opts, spec)


# The launch for q a (B, M, H, D) view, contiguous caches and extras, a contiguous weight.
_FA_CONTIG = _contiguous(
    ["s_qd", "s_wn", "s_kxd", "s_vxd", "s_xmt"],
    ["N", "s_qb", "s_qh", "s_qm", "s_cb", "s_ch", "s_wb", "s_kxb", "s_kxh", "s_kxt", "s_vxb", "s_vxh", "s_vxt"],
)

# name: (kernel, pointer/float types, constexprs, num_warps, compile options, specialisation).
# Configs come from the launchers' own helpers at the SD3 shapes (C = 64, F = 66, N = 4096).
# Strides are runtime values unless a specialisation is given: the generic (strided) build is
# the one with the most address registers.
KERNELS = {
    "token_stats": (token_stats._token_stats_kernel, _TS_BF16, _TS_CONST, _TS_NW, {}, None),
    "token_stats_fp32": (token_stats._token_stats_kernel, _TS_FP32, _TS_CONST, _TS_NW, {}, None),
    "token_stats_contiguous": (token_stats._token_stats_kernel, _TS_BF16, _TS_CONST, _TS_NW, {}, _TS_CONTIG),
    "cluster_score": (
        token_stats._cluster_score_kernel,
        {"cmax_ptr": "*fp32", "score_ptr": "*fp32"},
        {"BLOCK_NC": token_stats.BLOCK_NC, "BLOCK_C": 64},
        4, {}, None,
    ),
    "gather_tokens": (
        gather_scatter._gather_tokens_kernel,
        {"x_ptr": "*bf16", "idx_ptr": "*i64", "y_ptr": "*bf16"},
        {"BLOCK_K": gather_scatter.BLOCK_K, "BLOCK_D": 128},
        4, {}, None,
    ),
    "scatter_kv": (
        gather_scatter._scatter_rows_kernel,
        {"dst_ptr": "*bf16", "src_ptr": "*bf16", "dst2_ptr": "*bf16", "src2_ptr": "*bf16", "idx_ptr": "*i64"},
        {"TWO": True, "BLOCK_K": gather_scatter.BLOCK_K, "BLOCK_D": 128},
        4, {}, None,
    ),
    # Forecast: K and V together at SD3 (D = 64) and Flux (D = 128) head dims, and the noise cache.
    "forecast_kv_sd3": (forecast._forecast_kernel, _FC_KV, _fc_const(64, True), forecast.NUM_WARPS, _FC_OPTS, None),
    "forecast_kv_flux": (forecast._forecast_kernel, _FC_KV, _fc_const(128, True), forecast.NUM_WARPS, _FC_OPTS, None),
    "forecast_kv_flux_contiguous": (
        forecast._forecast_kernel, _FC_KV, _fc_const(128, True), forecast.NUM_WARPS, _FC_OPTS, _FC_CONTIG,
    ),
    "forecast_tokens_noise": (
        forecast._forecast_kernel, _FC_NOISE, _fc_const(64, False), forecast.NUM_WARPS, _FC_OPTS, None,
    ),
    # forecast_attention: SD3 (D = 64) and Flux (128) with fp32 slopes next to bf16 caches, Flux
    # with slopes in the cache dtype, PixArt's D = 72 (split 64 + 16), the paper's CAT (no slopes)
    # and fp32 models (3xTF32 dots); Flux's and Qwen-Image's (B, N, 24 * 128) caches, Qwen's with
    # its padded prompt's text mask.
    "forecast_attention_sd3": _fa(64),
    "forecast_attention_sd3_contiguous": _fa(64, spec=_FA_CONTIG),
    "forecast_attention_flux_contiguous": _fa(128, spec=_FA_CONTIG),
    "forecast_attention_flux_bf16_slopes": _fa(128, slope="*bf16"),
    "forecast_attention_d72_contiguous": _fa(72, spec=_FA_CONTIG),
    "forecast_attention_reuse": _fa(64, slope=None),
    "forecast_attention_fp32": _fa(64, dtype="*fp32"),
    "forecast_attention_fp32_d128": _fa(128, dtype="*fp32"),
    "forecast_attention_flux_flat": _fa(128, slope="*bf16", spec=_FA_CONTIG, heads=24),
    "forecast_attention_qwen_masked": _fa(128, slope="*bf16", spec=_FA_CONTIG, heads=24, xmask=True),
    "kmeans_assign": (
        kmeans._kmeans_assign_kernel, _KM_TYPES, _KM_CONST, kmeans.NUM_WARPS, {"enable_fp_fusion": False}, None,
    ),
    "kmeans_assign_contiguous": (
        kmeans._kmeans_assign_kernel, _KM_TYPES, _KM_CONST, kmeans.NUM_WARPS, {"enable_fp_fusion": False},
        _contiguous(["s_xf"], ["N", "s_xb"]),
    ),
    # The selection: a rank kernel (two radix passes of 32-bit keys per float order) and the
    # selection kernel (later-step path, a superset of the first-step one: three sorts).
    "select_ranks": (
        select._rank_tokens_kernel, _SEL_TYPES, {"BLOCK_N": 4096}, select._num_warps(4096), {}, None,
    ),
    "select_tokens": (
        select._select_tokens_kernel, _SEL_TYPES,
        {"FIRST": False, "BLOCK_N": 4096, "BLOCK_NC": 32},
        select._num_warps(4096), {"enable_fp_fusion": False}, None,
    ),
    # Flux at 2048x2048: N = 16384, the largest one program holds (select.MAX_BLOCK_N).
    "select_ranks_16384": (
        select._rank_tokens_kernel, _SEL_TYPES, {"BLOCK_N": 16384}, select._num_warps(16384), {}, None,
    ),
    "select_tokens_16384": (
        select._select_tokens_kernel, _SEL_TYPES,
        {"FIRST": False, "BLOCK_N": 16384, "BLOCK_NC": 32},
        select._num_warps(16384), {"enable_fp_fusion": False}, None,
    ),
}

# Spill bytes (stores + loads) allowed per kernel: none, except where measured and bounded.
# select_tokens_16384 holds 32 keys per thread in 128 registers (16 warps) and still spills a
# little around its three sorts: measured 3164 B (sm_90) and 3172 B (sm_80) per thread, against
# about 20 KB for the earlier one-kernel, int64-key version. The bound is that figure.
# forecast_attention in fp32 at D = 128 (3xTF32 dots: each operand held as two TF32 halves) spills
# at every tile tried; measured 220 B (sm_80) and 396 B (sm_90) per thread at 32 x 16 tiles, 4 warps.
# fp32 attention on a GPU is off the models' path (they run in bf16/fp16).
SPILL_LIMITS = dict.fromkeys(KERNELS, 0) | {"select_tokens_16384": 3200, "forecast_attention_fp32_d128": 512}


def _ptxas_usage(ptx: str, cc: int) -> tuple[int, int]:
    arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        res = subprocess.run(
            [PTXAS, "-v", f"-arch={arch}", path, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True, text=True, check=True,
        )
    regs = int(re.search(r"Used (\d+) registers", res.stderr).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", res.stderr))
    return regs, spills


def _compile(name: str, cc: int) -> dict:
    kernel, types, constexprs, num_warps, options, spec = KERNELS[name]
    constexprs, attrs = dict(constexprs), {}
    if spec:
        constexprs.update({arg: 1 for arg in spec["ones"]})
        for i, arg in enumerate(kernel.arg_names):
            if arg.endswith("_ptr") or arg in spec["div16"]:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=_sig(kernel, types, constexprs), constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": num_warps, **options})
    assert compiled.asm["cubin"]
    regs, spills = _ptxas_usage(compiled.asm["ptx"], cc)
    return {"regs": regs, "spills": spills, "shared": compiled.metadata.shared, "num_warps": num_warps}


# select_tokens_16384 for sm_80 takes about 4.5 minutes of ptxas on these 2-core machines and
# select_ranks_16384 about 3, too much for every CI run: the same sources compile for sm_80 at
# N=4096 above, and for sm_90 at 16384.
SLOW_ON_SM80 = ("select_tokens_16384", "select_ranks_16384")
CASES = [(name, cc) for name in KERNELS for cc in (80, 90) if not (cc == 80 and name in SLOW_ON_SM80)]


@pytest.fixture(scope="module")
def compiled() -> dict:
    """"name:cc" -> the case's registers, spills, shared memory and warps, or its error."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    res = subprocess.run([sys.executable, __file__, *(f"{name}:{cc}" for name, cc in CASES)],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0, f"the compile subprocess failed:\n{res.stderr[-4000:]}"
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name, cc", CASES)
def test_aot_compile(name, cc, compiled, record_property):
    info = compiled[f"{name}:{cc}"]
    assert "error" not in info, f"{name} failed to compile for sm_{cc}:\n{info['error'][-4000:]}"
    record_property(f"{name}_sm{cc}_registers", info["regs"])
    record_property(f"{name}_sm{cc}_spill_bytes", info["spills"])
    print(f"{name} sm_{cc} num_warps={info['num_warps']}: {info['regs']} registers, "
          f"{info['spills']} spill bytes, {info['shared']} B shared")
    limit = SPILL_LIMITS[name]
    assert info["spills"] <= limit, (
        f"{name} sm_{cc} spills {info['spills']} bytes ({info['regs']} registers), limit {limit}"
    )


def _compile_all(cases: list[str]) -> dict:
    out = {}
    for case in cases:
        name, cc = case.rsplit(":", 1)
        try:
            out[case] = _compile(name, int(cc))
        except Exception:  # reported by that case's test
            out[case] = {"error": traceback.format_exc()}
    return out


if __name__ == "__main__":
    print(json.dumps(_compile_all(sys.argv[1:])))
