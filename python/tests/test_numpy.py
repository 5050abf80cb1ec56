"""The NumPy path of attnkit.attention: against an independent NumPy softmax attention, against
the float64 oracle (float64 inputs) for every mask, score mod and normalizer, layouts, varlen,
the backward, and errors."""
import numpy as np
import pytest

import attnkit
from attnkit import masks, normalizers, score_mods

RNG = np.random.default_rng(7)


def rand(*shape, dtype=np.float32, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(dtype)


def naive(q, k, v, causal=False, scale=None):
    """Softmax attention in float64 NumPy, BHND, bottom-right causal."""
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    s = q @ np.swapaxes(k, -1, -2) * (scale or 1 / np.sqrt(q.shape[-1]))
    nq, nk = s.shape[-2:]
    if causal:
        allowed = np.arange(nk)[None, :] <= np.arange(nq)[:, None] + (nk - nq)
        s = np.where(allowed, s, -np.inf)
    m = s.max(-1, keepdims=True)
    p = np.exp(s - m)
    lse = (m + np.log(p.sum(-1, keepdims=True)))[..., 0]
    return (p / p.sum(-1, keepdims=True)) @ v, lse


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 4, 2, 37, 37, 40, 40), (1, 2, 1, 7, 130, 64, 24)])
def test_against_numpy(causal, shape):
    b, hq, hk, nq, nk, d, dv = shape
    q, k, v = rand(b, hq, nq, d), rand(b, hk, nk, d), rand(b, hk, nk, dv)
    out, lse = attnkit.attention(q, k, v, causal=causal, return_lse=True)
    ref, ref_lse = naive(q, k, v, causal)
    assert out.dtype == np.float32 and out.shape == (b, hq, nq, dv) and lse.shape == (b, hq, nq)
    assert rel(out, ref) < 1e-5
    assert np.allclose(lse, ref_lse, atol=1e-4)


def spec_cases(n, hq, dv):
    ids = np.repeat(np.arange(3, dtype=np.int32), -(-n // 3))[:n].copy()
    return {
        "causal": dict(causal=True),
        "window": dict(window=(5, 0)),
        "global_window": dict(mask=masks.GlobalWindow(3, 3, [0, n // 2])),
        "chunked": dict(mask=masks.Chunked(8, causal=True)),
        "document_and_causal": dict(mask=masks.Causal() & masks.Document(ids)),
        "or_not": dict(mask=masks.SlidingWindow(4, 4) | ~masks.Causal()),
        "block_attention": dict(mask=masks.BlockAttention(ids)),
        "prefix_lm": dict(mask=masks.PrefixLM(n // 3)),
        "neighborhood": dict(mask=masks.Neighborhood((6, n // 6), (3, 3))),
        "block_map": dict(mask=attnkit.BlockMask(
            (RNG.random((2, hq, -(-n // 8), -(-n // 16))) < 0.5).astype(np.int32), (8, 16))),
        "block_map_causal": dict(mask=masks.BlockMask(
            (RNG.random((1, 1, 3, 3)) < 0.7).astype(np.int32), 12) & masks.Causal()),
        "softcap": dict(causal=True, score_mod=score_mods.Softcap(5.0)),
        "alibi": dict(causal=True, score_mod=score_mods.ALiBi()),
        "alibi_slopes": dict(score_mod=score_mods.ALiBi(rand(hq) ** 2, symmetric=True)),
        "bias": dict(score_mod=score_mods.Bias(rand(1, hq, n, n))),
        "low_rank": dict(causal=True, score_mod=score_mods.LowRankBias(rand(2, hq, n, 3),
                                                                         rand(2, hq, n, 3))),
        "t5": dict(score_mod=score_mods.RelativeBuckets(rand(hq, 32))),
        "clipped": dict(score_mod=score_mods.RelativeBuckets(rand(hq, 9), "clipped", clip=4)),
        "forget": dict(causal=True, score_mod=score_mods.ForgetGate(
            np.log(RNG.uniform(0.5, 1, (2, hq, n))).astype(np.float32))),
        "mods_combined": dict(causal=True, score_mod=[score_mods.ALiBi(), score_mods.Softcap(8.0)]),
        "sink": dict(causal=True, sinks=rand(hq)),
        "sigmoid": dict(causal=True, normalizer="sigmoid"),
        "sigmoid_beta": dict(normalizer=normalizers.Sigmoid(beta=-2.0)),
        "kernel": dict(normalizer=normalizers.Kernel("relu", 2.0, length_scale=True), causal=True),
        "rela": dict(causal=True, normalizer=normalizers.ReLA(1 + 0.1 * rand(dv))),
        "gate": dict(causal=True, gate=rand(2, hq, n, dv)),
        "gate_per_head": dict(gate=rand(2, hq, n)),
    }


@pytest.mark.parametrize("name", list(spec_cases(36, 4, 24)))
def test_against_oracle(name):
    b, hq, hk, n, d, dv = 2, 4, 2, 36, 32, 24
    q, k, v = rand(b, hq, n, d), rand(b, hk, n, d), rand(b, hk, n, dv)
    kw = spec_cases(n, hq, dv)[name]
    out = attnkit.attention(q, k, v, **kw)
    ref = attnkit.attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), **kw)
    assert ref.dtype == np.float64
    assert not np.isnan(out).any()
    assert rel(out, ref) < 1e-5, name


def test_bnhd_matches_bhnd():
    q, k, v = rand(2, 4, 50, 32), rand(2, 4, 50, 32), rand(2, 4, 50, 32)
    t = lambda x: np.ascontiguousarray(x.transpose(0, 2, 1, 3))
    a = attnkit.attention(q, k, v, causal=True)
    b = attnkit.attention(t(q), t(k), t(v), causal=True, layout="bnhd")
    assert b.shape == (2, 50, 4, 32)
    assert rel(t(a), b) < 1e-6


def test_strided_views_without_copies():
    # A view with non-unit strides on the outer dims (a slice of heads) works in place ...
    big = rand(1, 8, 40, 32)
    q = big[:, ::2]
    out = attnkit.attention(q, q, q)
    ref, _ = naive(q, q, q)
    assert rel(out, ref) < 1e-5
    # ... and a non-unit inner stride is refused with the rule, never copied behind the scenes.
    with pytest.raises(ValueError, match="inner"):
        attnkit.attention(big[..., ::2], big[..., ::2], big[..., ::2])


def test_varlen():
    cu = np.array([0, 5, 40, 64], dtype=np.int32)
    q, k, v = rand(64, 4, 32), rand(64, 2, 32), rand(64, 2, 16)
    out, lse = attnkit.attention(q, k, v, causal=True, cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                 return_lse=True)
    assert out.shape == (64, 4, 16) and lse.shape == (4, 64)
    for s, e in zip(cu[:-1], cu[1:]):
        part = lambda x: x[s:e].transpose(1, 0, 2)[None]
        ref, _ = naive(part(q), part(k), part(v), causal=True)
        assert rel(out[s:e].transpose(1, 0, 2)[None], ref) < 1e-5


def test_row_stats_per_normalizer():
    q = rand(1, 2, 16, 8)
    _, lse = attnkit.attention(q, q, q, normalizer="sigmoid", return_lse=True)
    assert lse is None
    _, rms = attnkit.attention(q, q, q, normalizer=normalizers.ReLA(np.ones(8, np.float32)),
                               return_lse=True)
    assert rms.shape == (1, 2, 16) and (rms > 0).all()


@pytest.mark.parametrize("name", ["causal", "block_map", "bias", "sink", "gate", "alibi_slopes",
                                  "sigmoid",
                                  "t5", "forget", "low_rank", "rela", "kernel"])
def test_backward_against_oracle(name):
    b, hq, hk, n, d, dv = 2, 4, 2, 36, 32, 24
    q, k, v = rand(b, hq, n, d), rand(b, hk, n, d), rand(b, hk, n, dv)
    go = rand(b, hq, n, dv)
    kw = spec_cases(n, hq, dv)[name]
    out, stat = attnkit.attention(q, k, v, return_lse=True, **kw)
    extra = {"bias": "dbias", "sink": "dsinks", "gate": "dgate", "alibi_slopes": "dalibi_slopes",
             "sigmoid": "dbeta", "t5": "drelative_table", "forget": "dforget_log_f",
             "low_rank": "dlow_rank_u", "rela": "drela_gain"}
    names = ("dq", "dk", "dv") + ((extra[name],) if name in extra else ())
    g = attnkit.attention_backward(q, k, v, out, stat, go, grads=names, **kw)
    d64 = lambda x: x.astype(np.float64)
    r = attnkit.attention_backward(d64(q), d64(k), d64(v), None, None, d64(go), grads=names, **kw)
    for key in names:
        assert g[key].dtype == np.float32 and r[key].dtype == np.float64
        assert rel(g[key], r[key]) < 1e-4, (name, key)


def test_errors_name_the_rule():
    q = rand(1, 2, 16, 8)
    with pytest.raises(ValueError, match="head_dim|d"):
        attnkit.attention(q, rand(1, 2, 16, 4), rand(1, 2, 16, 8))
    with pytest.raises(ValueError, match="GQA|divis|multiple"):
        attnkit.attention(rand(1, 3, 16, 8), rand(1, 2, 16, 8), rand(1, 2, 16, 8))
    with pytest.raises(TypeError):
        attnkit.attention(q.astype(np.int64), q, q)
    with pytest.raises(ValueError, match="window"):
        attnkit.attention(q, q, q, window=(-3, 0))
    with pytest.raises(ValueError, match="normalizer"):
        attnkit.attention(q, q, q, normalizer="nope")
    with pytest.raises(TypeError, match="mask"):
        attnkit.attention(q, q, q, mask="causal")


def test_support_matrix_and_target():
    rows = attnkit.support_matrix()
    assert ("causal", "mask", "cpu", True, True, ["fp32", "bf16", "fp16"]) in rows
    assert attnkit.cpu_simd_target()


def test_mask_cache_is_ignored_on_the_cpu():
    q, k, v = rand(1, 2, 40, 16), rand(1, 2, 40, 16), rand(1, 2, 40, 16)
    doc = masks.Document(np.repeat(np.arange(4, dtype=np.int32), 10))
    cache = attnkit.MaskCache()
    plain = attnkit.attention(q, k, v, mask=doc)
    cached = attnkit.attention(q, k, v, mask=doc, mask_cache=cache)
    np.testing.assert_array_equal(plain, cached)
    assert cache.entries == 0 and cache.bytes == 0
    out, lse = attnkit.attention(q, k, v, mask=doc, return_lse=True)
    grads = attnkit.attention_backward(q, k, v, out, lse, rand(1, 2, 40, 16), mask=doc,
                                       mask_cache=cache)
    assert grads["dq"].shape == q.shape
    with pytest.raises(TypeError, match="attnkit.MaskCache"):
        attnkit.attention(q, k, v, mask=doc, mask_cache=object())
