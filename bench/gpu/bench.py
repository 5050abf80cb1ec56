"""attnkit's CUDA forward beside its peers on the same GPU, in one process (issue 5's table).

Every case first checks attnkit against PyTorch's float32 math on the same inputs (relative
Frobenius error), then times attnkit and the peers with triton's do_bench (median of the
repetitions). Peers: SDPA's FlashAttention-2 and cuDNN backends (dense, causal), FlexAttention
(masks and score mods), SDPA's mem-efficient backend (dense bias).
Usage: python3 bench/gpu/bench.py [--quick] [--train] [--only PART,...] (--train: only forward +
backward; --only: the parts named, of dense, masked, neighborhood, bias, train (train_dense,
train_masked, train_bias), train_dense, train_masked, train_bias, wide (head dims 192 and 256);
attnkit importable: PYTHONPATH=build/python);
writes $OUT/gpu_bench.json. FLOPs count allowed pairs only (4 * pairs * d). BENCH_NS="N ...": the
dense part's sequence lengths (default 1024 4096 16384).
"""
import contextlib
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import attnkit

QUICK = "--quick" in sys.argv
BENCH_NS = [int(x) for x in os.environ.get("BENCH_NS", "").split()]
OUT = os.environ.get("OUT", "/tmp")
dev = "cuda"
rows = []


def emit(**kw):
    rows.append(kw)
    print(json.dumps(kw), flush=True)


def bench(fn):
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


@contextlib.contextmanager
def env(**switches):
    # Backend switches set for a block (for measurements), then restored as they were.
    saved = {name: os.environ.get(name) for name in switches}
    os.environ.update(switches)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def rel_err(out, ref):
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def math_ref(q, k, v, mask=None, bias=None, softcap=None):
    """float32 attention on [B, H, N, d] with an optional boolean mask [Nq, Nk]."""
    s = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if bias is not None:
        s = s + bias.float()
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0) @ v.float()


def peer_rate(flops, fn):
    """TFLOP/s of a peer, or nan where it refuses the shape (a head dim it lacks)."""
    try:
        return flops / bench(fn) / 1e9
    except RuntimeError:
        return float("nan")


def dense(configs=((128, 16), (64, 32)), ns=None):
    for d, h in configs:
        for n in ns or BENCH_NS or ([4096] if QUICK else [1024, 4096, 16384]):
            b = max(1, 16384 // n)
            q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=torch.bfloat16) for _ in range(3))
            for causal in (False, True):
                flops = 4 * b * h * n * n * d / (2 if causal else 1)
                out = attnkit.attention(q, k, v, causal=causal)
                if n <= 4096:
                    m = torch.ones(n, n, dtype=torch.bool, device=dev).tril() if causal else None
                    ref = math_ref(q[:1, :4], k[:1, :4], v[:1, :4], m)
                    err = rel_err(out[:1, :4], ref)
                else:
                    err = None
                res = dict(case="dense", d=d, h=h, n=n, b=b, causal=causal, rel_err=err)
                res["attnkit"] = flops / bench(lambda: attnkit.attention(q, k, v, causal=causal)) / 1e9
                with env(ATTNKIT_CUDA_PINGPONG="0"):  # the same kernel without turn-taking
                    res["attnkit_no_pingpong"] = flops / bench(
                        lambda: attnkit.attention(q, k, v, causal=causal)) / 1e9
                for name, be in [("fa2", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)]:
                    with sdpa_kernel(be):
                        res[name] = peer_rate(
                            flops, lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
                res["vs_fa2"] = res["attnkit"] / res["fa2"]
                res["vs_cudnn"] = res["attnkit"] / res["cudnn"]
                emit(**res)
            del q, k, v


def masked_cases(n, h):
    """name -> (FlexAttention mask_mod or None, attnkit keyword arguments, Flex score_mod or None,
    density) of the masked comparisons, on N = n tokens and h heads."""
    docs = torch.tensor([0] * 3000 + [1] * 2000 + [2] * (n - 5000), device=dev, dtype=torch.int32)
    qi = torch.arange(n, device=dev)[:, None]
    ki = torch.arange(n, device=dev)[None, :]
    slopes = torch.exp2(-8 * torch.arange(1, h + 1, device=dev) / h)
    rows, cols = 64, n // 64  # the 2-D neighborhood's grid (NATTEN's window: 13 x 13 around
    # the query, shifted inside the grid at its edges)

    def na_mod(bb, hh, i, j):
        lo_r = torch.clamp(i // cols - 6, 0, rows - 13)
        lo_c = torch.clamp(i % cols - 6, 0, cols - 13)
        return ((j // cols >= lo_r) & (j // cols < lo_r + 13) & (j % cols >= lo_c) &
                (j % cols < lo_c + 13))
    cases = {
        "causal": (lambda bb, hh, i, j: i >= j, dict(causal=True), None),
        "sliding1024-causal": (lambda bb, hh, i, j: (i >= j) & (i - j <= 1024),
                               dict(window=(1024, 0)), None),
        "document-causal": (lambda bb, hh, i, j: (docs[i] == docs[j]) & (i >= j),
                            dict(mask=attnkit.masks.Causal() & attnkit.masks.Document(docs)), None),
        "softcap30": (None, dict(score_mod=attnkit.score_mods.Softcap(30.0)),
                      lambda s, bb, hh, i, j: 30 * torch.tanh(s / 30)),
        "alibi-causal": (lambda bb, hh, i, j: i >= j,
                         dict(causal=True, score_mod=attnkit.score_mods.ALiBi()),
                         lambda s, bb, hh, i, j: s - slopes[hh] * (i - j)),
        # (the grid tiles forward; the backward's tables built per call, or once when cached)
        "neighborhood13x13": (na_mod, dict(mask=attnkit.masks.Neighborhood((rows, cols),
                                                                            kernel=(13, 13))),
                              None),
    }
    return {name: (mm, kw, sm, mm(0, 0, qi, ki).float().mean().item() if mm else 1.0)
            for name, (mm, kw, sm) in cases.items()}


def masked():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    fa = torch.compile(flex_attention, dynamic=False)
    n, b, h, d = 8192, 2, 16, 128
    q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=torch.bfloat16) for _ in range(3))
    for name, kw, mm, sm, frac in with_cached(masked_cases(n, h)):
        if name == "neighborhood13x13 cached":
            continue  # (the forward's grid tiles build no tables: the same row)
        flops = 4 * b * h * n * n * d * frac
        bm = create_block_mask(mm, None, None, n, n, device=dev) if mm else None
        out = attnkit.attention(q, k, v, **kw)
        ref = fa(q, k, v, block_mask=bm, score_mod=sm)
        res = dict(case="masked", mask=name, n=n, b=b, h=h, d=d, density=frac,
                   rel_err_vs_flex=rel_err(out, ref))
        res["attnkit"] = flops / bench(lambda: attnkit.attention(q, k, v, **kw)) / 1e9
        res["flex"] = flops / bench(lambda: fa(q, k, v, block_mask=bm, score_mod=sm)) / 1e9
        res["vs_flex"] = res["attnkit"] / res["flex"]
        emit(**res)
    del q, k, v


def with_cached(cases):
    """(name, attnkit kwargs, mask_mod, score_mod, density) of each case, and again with an
    attnkit.MaskCache for those with a mask object (its tables built once, as Flex's BlockMask
    is: create_block_mask runs outside the timed calls)."""
    for name, (mm, kw, sm, frac) in cases.items():
        yield name, kw, mm, sm, frac
        if "mask" in kw:
            yield name + " cached", dict(kw, mask_cache=attnkit.MaskCache()), mm, sm, frac


def neighborhood():
    # 2-D neighborhood 13 x 13 on a 64 x 128 grid (8192 tokens) against dense attention.
    b, h, d, n = 2, 16, 128, 64 * 128
    q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=torch.bfloat16) for _ in range(3))
    na = attnkit.masks.Neighborhood((64, 128), kernel=(13, 13))
    ms_na = bench(lambda: attnkit.attention(q, k, v, mask=na))  # grid tiles where built
    with env(ATTNKIT_CUDA_GRID_KEY_W="16"):  # key boxes of 8 x 16 (the default takes 4 x 32)
        ms_key16 = bench(lambda: attnkit.attention(q, k, v, mask=na))
    with env(ATTNKIT_CUDA_GRID="0"):  # the block table's path, built per call and cached
        ms_table = bench(lambda: attnkit.attention(q, k, v, mask=na))
        cache = attnkit.MaskCache()
        ms_cached = bench(lambda: attnkit.attention(q, k, v, mask=na, mask_cache=cache))
    ms_dense = bench(lambda: attnkit.attention(q, k, v))
    emit(case="neighborhood_2d", grid=[64, 128], kernel=[13, 13], n=n, b=b, h=h, d=d,
         attnkit_ms=ms_na, dense_ms=ms_dense, speedup_vs_dense=ms_dense / ms_na,
         key16_ms=ms_key16, key16_speedup_vs_dense=ms_dense / ms_key16,
         table_ms=ms_table, table_speedup_vs_dense=ms_dense / ms_table,
         cached_ms=ms_cached, cached_speedup_vs_dense=ms_dense / ms_cached)
    # Narrow grids: patches of 8 x 16 queries 3/8 full (w 6), half (w 8) and 5/8 (w 10), each
    # timed both ways (grid_tiles_worth_it takes grid tiles from a quarter full, run 120).
    for w in (6, 8, 10):
        rows = 8192 // w
        na = attnkit.masks.Neighborhood((rows, w), kernel=(5, 5))
        q, k, v = (torch.randn(b, h, rows * w, d, device=dev, dtype=torch.bfloat16)
                   for _ in range(3))
        with env(ATTNKIT_CUDA_GRID="force"):
            ms_grid = bench(lambda: attnkit.attention(q, k, v, mask=na))
            out_grid = attnkit.attention(q, k, v, mask=na)
        with env(ATTNKIT_CUDA_GRID="0"):
            ms_table = bench(lambda: attnkit.attention(q, k, v, mask=na))
            out_table = attnkit.attention(q, k, v, mask=na)
        emit(case="neighborhood_narrow", grid=[rows, w], kernel=[5, 5], grid_ms=ms_grid,
             table_ms=ms_table, grid_vs_table=ms_table / ms_grid,
             rel_err=rel_err(out_grid, out_table))


def bias():
    b, h, n, d = 2, 16, 4096, 128
    q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=torch.bfloat16) for _ in range(3))
    bias_t = torch.randn(b, h, n, n, device=dev, dtype=torch.bfloat16)
    flops = 4 * b * h * n * n * d
    out = attnkit.attention(q, k, v, score_mod=attnkit.score_mods.Bias(bias_t))
    ref = math_ref(q[:1, :2], k[:1, :2], v[:1, :2], bias=bias_t[:1, :2])
    res = dict(case="bias", n=n, b=b, h=h, d=d, rel_err=rel_err(out[:1, :2], ref))
    res["attnkit"] = flops / bench(
        lambda: attnkit.attention(q, k, v, score_mod=attnkit.score_mods.Bias(bias_t))) / 1e9
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        res["mem_efficient"] = flops / bench(
            lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias_t)) / 1e9
    res["vs_mem_efficient"] = res["attnkit"] / res["mem_efficient"]
    emit(**res)


def train_step(fn, q, k, v, go):
    """One forward + backward of fn, the gradients cleared first."""
    def step():
        for t in (q, k, v):
            t.grad = None
        fn().backward(go)
    return step


def fwd_bwd(fn, q, k, v, go):
    return bench(train_step(fn, q, k, v, go))


def train_dense(configs=((128, 16), (64, 32)), ns=None):
    """Forward + backward of dense and causal attention against FlashAttention-2 and cuDNN."""
    for d, h in configs:
        for n in ns or ([4096] if QUICK else [1024, 4096, 16384]):
            b = max(1, 16384 // n)
            q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            go = torch.randn(b, h, n, d, device=dev, dtype=torch.bfloat16)
            for causal in (False, True):
                flops = 3.5 * 4 * b * h * n * n * d / (2 if causal else 1)
                res = dict(case="train", d=d, h=h, n=n, b=b, causal=causal)
                if n <= 1024:  # gradients against SDPA's math backend in fp32
                    qs, ks, vs = (t[:1, :2].detach().float().requires_grad_() for t in (q, k, v))
                    with sdpa_kernel(SDPBackend.MATH):
                        F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal).backward(go[:1, :2].float())
                    qa, ka, va = (t[:1, :2].detach().clone().requires_grad_() for t in (q, k, v))
                    attnkit.attention(qa, ka, va, causal=causal).backward(go[:1, :2])
                    res["rel_err"] = max(rel_err(a.grad, r.grad) for a, r in ((qa, qs), (ka, ks), (va, vs)))
                res["attnkit"] = flops / fwd_bwd(lambda: attnkit.attention(q, k, v, causal=causal),
                                                 q, k, v, go) / 1e9
                for name, be in [("fa2", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)]:
                    with sdpa_kernel(be):
                        res[name] = peer_rate(flops, train_step(
                            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                            q, k, v, go))
                res["vs_fa2"] = res["attnkit"] / res["fa2"]
                res["vs_cudnn"] = res["attnkit"] / res["cudnn"]
                emit(**res)
            del q, k, v


def wide():
    """Head dims 192 and 256 (built with ATTNKIT_HEAD_DIMS; the backward with
    ATTNKIT_BWD_MAX_HEAD_DIM=256), forward and forward + backward, N 1024 and 4096."""
    configs, ns = ((192, 16), (256, 16)), [1024, 4096]
    dense(configs, ns)
    train_dense(configs, ns)


def train():
    """Forward + backward through autograd (FLOPs: 3.5x the forward's, FlashAttention's count).
    attnkit's CUDA backward writes dq, dk and dv in the inputs' dtype (bf16), as the peers do."""
    train_dense()
    train_masked()
    train_bias()


def train_masked():
    """Forward + backward of the masked cases beside FlexAttention's (N 8192)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    # The forward section's compilations fill dynamo's cache: without a reset, FlexAttention's
    # ALiBi backward here fell back to an unfused path (8 TFLOP/s in runs 24 and 26).
    torch._dynamo.reset()
    fa = torch.compile(flex_attention, dynamic=False)
    n, b, h, d = 8192, 2, 16, 128
    q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    go = torch.randn(b, h, n, d, device=dev, dtype=torch.bfloat16)
    for name, kw, mm, sm, frac in with_cached(masked_cases(n, h)):
        if name == "causal":
            continue  # the dense table has it
        flops = 3.5 * 4 * b * h * n * n * d * frac
        bm = create_block_mask(mm, None, None, n, n, device=dev) if mm else None
        res = dict(case="train_masked", mask=name, n=n, b=b, h=h, d=d, density=frac)
        res["attnkit"] = flops / fwd_bwd(lambda: attnkit.attention(q, k, v, **kw), q, k, v, go) / 1e9
        res["flex"] = flops / fwd_bwd(lambda: fa(q, k, v, block_mask=bm, score_mod=sm), q, k, v, go) / 1e9
        res["vs_flex"] = res["attnkit"] / res["flex"]
        emit(**res)
    del q, k, v


def train_bias():
    """A learnable dense bias: forward + backward with dBias, against SDPA's mem-efficient
    backend (the only PyTorch backend with a bias gradient)."""
    b, h, n, d = 2, 16, 4096, 128
    q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    bias_t = torch.randn(b, h, n, n, device=dev, dtype=torch.bfloat16, requires_grad=True)
    go = torch.randn(b, h, n, d, device=dev, dtype=torch.bfloat16)
    flops = 3.5 * 4 * b * h * n * n * d

    def step(fn):
        def run():
            for t in (q, k, v, bias_t):
                t.grad = None
            fn().backward(go)
        return flops / bench(run) / 1e9

    res = dict(case="train_bias", n=n, b=b, h=h, d=d)
    res["attnkit"] = step(lambda: attnkit.attention(q, k, v, score_mod=attnkit.score_mods.Bias(bias_t)))
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        res["mem_efficient"] = step(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias_t))
    res["vs_mem_efficient"] = res["attnkit"] / res["mem_efficient"]
    emit(**res)


if __name__ == "__main__":
    print("device:", torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    parts = (train,) if "--train" in sys.argv else (dense, masked, neighborhood, bias, train)
    if "--only" in sys.argv:
        named = dict(dense=dense, masked=masked, neighborhood=neighborhood, bias=bias, train=train,
                     train_dense=train_dense, train_masked=train_masked,
                     train_bias=train_bias, wide=wide)
        parts = [named[x] for x in sys.argv[sys.argv.index("--only") + 1].split(",")]
    for part in parts:
        try:
            part()
        except Exception as e:  # report and go on: one broken case must not hide the others
            emit(case=part.__name__, error=repr(e)[:400])
    with open(os.path.join(OUT, "gpu_bench.json"), "w") as fh:
        json.dump(rows, fh, indent=1)
    print("\n%-34s %9s %9s %9s %9s" % ("case", "attnkit", "peer", "ratio", "rel_err"))
    for r in rows:
        if "error" in r:
            print("%-34s ERROR %s" % (r["case"], r["error"][:80]))
        elif r["case"] == "dense":
            tag = "dense d%d n%d%s" % (r["d"], r["n"], " causal" if r["causal"] else "")
            print("%-34s %9.0f %9.0f %9.2f %9s  (fa2 %.0f, x%.2f; no ping-pong %.0f)" % (
                tag + " vs cudnn", r["attnkit"], r["cudnn"], r["vs_cudnn"],
                "%.1e" % r["rel_err"] if r["rel_err"] is not None else "-", r["fa2"], r["vs_fa2"],
                r["attnkit_no_pingpong"]))
        elif r["case"] == "masked":
            print("%-34s %9.0f %9.0f %9.2f %9.1e" % (r["mask"] + " vs flex", r["attnkit"], r["flex"],
                                                     r["vs_flex"], r["rel_err_vs_flex"]))
        elif r["case"] == "neighborhood_2d":
            print("%-34s %8.3fms %7.3fms %9.2f" % ("neighborhood 13x13 vs dense", r["attnkit_ms"],
                                                   r["dense_ms"], r["speedup_vs_dense"]))
            if "key16_ms" in r:
                print("%-34s %8.3fms %7.3fms %9.2f" % ("neighborhood 8x16 key boxes vs dense",
                                                       r["key16_ms"], r["dense_ms"],
                                                       r["key16_speedup_vs_dense"]))
            print("%-34s %8.3fms %7.3fms %9.2f" % ("neighborhood table vs dense", r["table_ms"],
                                                   r["dense_ms"], r["table_speedup_vs_dense"]))
            print("%-34s %8.3fms %7.3fms %9.2f" % ("neighborhood table cached vs dense",
                                                   r["cached_ms"], r["dense_ms"],
                                                   r["cached_speedup_vs_dense"]))
        elif r["case"] == "neighborhood_narrow":
            print("%-34s %8.3fms %7.3fms %9.2f %9.1e" % (
                "narrow %dx%d grid tiles vs table" % tuple(r["grid"]), r["grid_ms"], r["table_ms"],
                r["grid_vs_table"], r["rel_err"]))
        elif r["case"] == "train":
            tag = "fwd+bwd d%d n%d%s" % (r["d"], r["n"], " causal" if r["causal"] else "")
            print("%-34s %9.0f %9.0f %9.2f %9s  (fa2 %.0f, x%.2f)" % (
                tag + " vs cudnn", r["attnkit"], r["cudnn"], r["vs_cudnn"],
                "%.1e" % r["rel_err"] if "rel_err" in r else "-", r["fa2"], r["vs_fa2"]))
        elif r["case"] == "train_masked":
            print("%-34s %9.0f %9.0f %9.2f" % ("fwd+bwd " + r["mask"] + " vs flex", r["attnkit"],
                                               r["flex"], r["vs_flex"]))
        elif r["case"] == "train_bias":
            print("%-34s %9.0f %9.0f %9.2f" % ("fwd+bwd bias+dbias vs mem-efficient", r["attnkit"],
                                               r["mem_efficient"], r["vs_mem_efficient"]))
        elif r["case"] == "bias":
            print("%-34s %9.0f %9.0f %9.2f %9.1e" % ("bias vs mem-efficient", r["attnkit"],
                                                     r["mem_efficient"], r["vs_mem_efficient"],
                                                     r["rel_err"]))
