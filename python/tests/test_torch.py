"""The PyTorch path: the attnkit::attention custom op against torch's SDPA, autograd for q, k,
v and every learnable extra (gradcheck in float64 through the oracle), torch.compile with
fullgraph=True, opcheck, and CUDA tensors refused with a TypeError naming the rule. Skipped where
PyTorch is not installed (CI); run on the GPU machine (docs/python.md)."""
import itertools
import math
import os
import threading

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import attnkit  # noqa: E402
from attnkit import masks, normalizers, score_mods  # noqa: E402

torch.manual_seed(0)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def sdpa(q, k, v, causal=False, bias=None, scale=None):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    if causal:  # bottom-right, as attnkit's default
        nq, nk = q.shape[2], k.shape[2]
        allowed = torch.arange(nk)[None, :] <= torch.arange(nq)[:, None] + (nk - nq)
        m = torch.zeros(nq, nk, dtype=q.dtype).masked_fill(~allowed, -math.inf)
        bias = m if bias is None else bias + m
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_matches_sdpa(causal, dtype):
    q = torch.randn(2, 4, 70, 64, dtype=dtype)
    k, v = torch.randn(2, 2, 70, 64, dtype=dtype), torch.randn(2, 2, 70, 64, dtype=dtype)
    out, lse = attnkit.attention(q, k, v, causal=causal, return_lse=True)
    ref = sdpa(q.float(), k.float(), v.float(), causal)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == (2, 4, 70)
    assert rel(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_autograd_matches_sdpa():
    q = torch.randn(2, 4, 45, 32, requires_grad=True)
    k = torch.randn(2, 2, 50, 32, requires_grad=True)
    v = torch.randn(2, 2, 50, 24, requires_grad=True)
    bias = torch.randn(1, 4, 45, 50, requires_grad=True)
    go = torch.randn(2, 4, 45, 24)
    out = attnkit.attention(q, k, v, causal=True, score_mod=score_mods.Bias(bias))
    grads = torch.autograd.grad(out, (q, k, v, bias), go)
    q64, k64, v64, b64 = (t.detach().double().requires_grad_() for t in (q, k, v, bias))
    ref = sdpa(q64, k64, v64, True, bias=b64)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64, b64), go.double())
    assert rel(out, ref) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.float32
        assert rel(g, r) < 1e-4


def _cases(n, h, dv):
    ids = torch.tensor([0] * (n // 2) + [1] * (n - n // 2), dtype=torch.int32)
    p = lambda *s: torch.randn(*s, dtype=torch.float64, requires_grad=True)
    return {
        "causal": lambda: dict(causal=True),
        "document_window": lambda: dict(mask=masks.Document(ids) & masks.SlidingWindow(2, 1)),
        "block_map": lambda: dict(mask=attnkit.BlockMask(
            torch.tensor([[[[1, 0], [1, 1]], [[0, 1], [1, 0]]]], dtype=torch.int32), 3)),
        "bias": lambda: dict(score_mod=score_mods.Bias(p(1, h, n, n))),
        "sinks": lambda: dict(causal=True, sinks=p(h)),
        "softcap_alibi_slopes": lambda: dict(causal=True, score_mod=[
            score_mods.ALiBi((torch.rand(h, dtype=torch.float64) + 0.1).requires_grad_()),
            score_mods.Softcap(3.0)]),
        "relative": lambda: dict(score_mod=score_mods.RelativeBuckets(p(h, 9), "clipped", clip=4)),
        "forget": lambda: dict(causal=True, score_mod=score_mods.ForgetGate(
            (-torch.rand(1, h, n, dtype=torch.float64)).requires_grad_())),
        "low_rank": lambda: dict(score_mod=score_mods.LowRankBias(p(1, h, n, 2), p(1, h, n, 2))),
        "sigmoid_beta": lambda: dict(causal=True, normalizer=normalizers.Sigmoid(p(1))),
        "kernel": lambda: dict(normalizer=normalizers.Kernel("softplus", 1.5)),
        "rela_gain": lambda: dict(causal=True, normalizer=normalizers.ReLA(
            (1 + 0.1 * torch.randn(dv, dtype=torch.float64)).requires_grad_())),
        "gate": lambda: dict(causal=True, gate=p(1, h, n, dv)),
        "gate_per_head": lambda: dict(gate=p(1, h, n)),
    }


@pytest.mark.parametrize("name", list(_cases(6, 2, 3)))
def test_gradcheck_float64(name):
    n, h, d, dv = 6, 2, 4, 3
    kw = _cases(n, h, dv)[name]()
    q = torch.randn(1, h, n, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, h, n, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, h, n, dv, dtype=torch.float64, requires_grad=True)
    extras = [t for t in _leaves(kw) if t.requires_grad]

    def f(q, k, v, *ex):
        swapped = _swap(kw, dict(zip(map(id, extras), ex)))
        return attnkit.attention(q, k, v, **swapped)

    assert torch.autograd.gradcheck(f, (q, k, v, *extras), atol=1e-6, rtol=1e-5)


def _leaves(x):
    if torch.is_tensor(x):
        yield x
    elif isinstance(x, dict):
        for val in x.values():
            yield from _leaves(val)
    elif isinstance(x, (list, tuple)):
        for val in x:
            yield from _leaves(val)
    elif hasattr(x, "__dict__"):
        yield from _leaves(vars(x))


def _swap(x, by_id):
    """A copy of the kwargs with the leaf tensors replaced (gradcheck perturbs its own inputs)."""
    if torch.is_tensor(x):
        return by_id.get(id(x), x)
    if isinstance(x, dict):
        return {key: _swap(val, by_id) for key, val in x.items()}
    if isinstance(x, list):
        return [_swap(val, by_id) for val in x]
    if isinstance(x, tuple):
        return tuple(_swap(val, by_id) for val in x)
    if hasattr(x, "__dict__") and not isinstance(x, type):
        obj = object.__new__(type(x))
        obj.__dict__.update({key: _swap(val, by_id) for key, val in vars(x).items()})
        return obj
    return x


def test_bf16_grads_have_input_dtype():
    q = torch.randn(1, 2, 40, 32, dtype=torch.bfloat16, requires_grad=True)
    sinks = torch.randn(2, requires_grad=True)
    out = attnkit.attention(q, q, q, causal=True, sinks=sinks)
    out.float().square().sum().backward()
    assert q.grad.dtype == torch.bfloat16 and sinks.grad.dtype == torch.float32
    assert torch.isfinite(q.grad.float()).all() and torch.isfinite(sinks.grad).all()


def test_torch_compile_fullgraph():
    q, k, v = (torch.randn(2, 4, 64, 32, requires_grad=True) for _ in range(3))
    slopes = torch.rand(4) + 0.1

    def f(q, k, v):
        out = attnkit.attention(q, k, v, window=(16, 0),
                                score_mod=[score_mods.Softcap(20.0), score_mods.ALiBi(slopes)])
        return out.square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    loss_e = f(q, k, v)
    grads_e = torch.autograd.grad(loss_e, (q, k, v))
    assert torch.allclose(loss, loss_e)
    for g, e in zip(grads, grads_e):
        assert torch.allclose(g, e)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_torch_compile_fullgraph():
    """torch.compile(fullgraph=True) with the inductor backend over CUDA tensors: the custom ops
    trace (fake tensors on the device) and give the eager path's loss and gradients."""
    torch.manual_seed(4)
    q, k, v = (torch.randn(2, 4, 200, 64, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    sinks = torch.randn(4, device="cuda", requires_grad=True)

    def f(q, k, v, sinks):
        out = attnkit.attention(q * 1.5, k, v, causal=True, window=(64, 0), sinks=sinks,
                                score_mod=score_mods.Softcap(20.0))
        return out.float().square().sum()

    compiled = torch.compile(f, fullgraph=True)
    loss = compiled(q, k, v, sinks)
    grads = torch.autograd.grad(loss, (q, k, v, sinks))
    loss_e = f(q, k, v, sinks)
    grads_e = torch.autograd.grad(loss_e, (q, k, v, sinks))
    assert torch.allclose(loss, loss_e, rtol=1e-3)
    for g, e in zip(grads, grads_e):
        assert g.is_cuda and g.dtype == e.dtype
        assert (g.float() - e.float()).norm() <= 1e-2 * e.float().norm()


def test_custom_op_autograd_matches_eager():
    from attnkit import _spec
    q, k, v = (torch.randn(1, 2, 30, 16, requires_grad=True) for _ in range(3))
    sinks = torch.randn(2, requires_grad=True)
    spec = _spec.build(q=q, v=v, causal=True, window=None, mask=None, score_mod=None,
                       normalizer="softmax", scale=None, sinks=sinks, gate=None,
                       cu_seqlens_q=None, cu_seqlens_kv=None, layout="bhnd",
                       alignment="bottom_right")
    text, tensors, _ = _spec.encode(spec)
    out_op, _ = torch.ops.attnkit.attention(q, k, v, text, tensors, 0)
    out = attnkit.attention(q, k, v, causal=True, sinks=sinks)
    g_op = torch.autograd.grad(out_op.sum(), (q, k, v, sinks))
    g = torch.autograd.grad(out.sum(), (q, k, v, sinks))
    assert torch.equal(out_op, out)
    for a, b in zip(g_op, g):
        assert torch.equal(a, b)


def test_opcheck():
    from attnkit import _spec
    q, k, v = (torch.randn(1, 2, 20, 16, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 2, 20, 20, requires_grad=True)
    spec = _spec.build(q=q, v=v, causal=True, window=None, mask=None,
                       score_mod=score_mods.Bias(bias), normalizer="softmax", scale=None,
                       sinks=None, gate=None, cu_seqlens_q=None, cu_seqlens_kv=None,
                       layout="bhnd", alignment="bottom_right")
    text, tensors, _ = _spec.encode(spec)
    torch.library.opcheck(torch.ops.attnkit.attention.default, (q, k, v, text, tensors, 0))


def test_errors_cross_as_python_exceptions():
    q = torch.randn(1, 2, 16, 8)
    with pytest.raises(ValueError, match="window"):
        attnkit.attention(q, q, q, window=(-1, 0))
    with pytest.raises(TypeError):
        attnkit.attention(q.int(), q.int(), q.int())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_forward_matches_the_cpu(dtype):
    torch.manual_seed(3)
    q = torch.randn(2, 4, 100, 64, device="cuda", dtype=dtype)
    k = torch.randn(2, 2, 130, 64, device="cuda", dtype=dtype)
    v = torch.randn(2, 2, 130, 64, device="cuda", dtype=dtype)
    for kw in [dict(causal=True), dict(window=(32, 0)), dict(score_mod=attnkit.score_mods.Softcap(20.0))]:
        out, lse = attnkit.attention(q, k, v, return_lse=True, **kw)
        assert out.is_cuda and out.dtype == dtype
        ref, ref_lse = attnkit.attention(q.cpu().float(), k.cpu().float(), v.cpu().float(),
                                         return_lse=True, **kw)
        err = (out.cpu().float() - ref).norm() / ref.norm()
        assert err < 1e-2, (kw, float(err))
        assert torch.allclose(lse.cpu(), ref_lse, atol=1e-3, rtol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("d", [64, 128])
def test_cuda_varlen_matches_the_cpu(d):
    # Packed sequences of uneven lengths (some shorter than a tile, one spanning many): the fast
    # kernel reads them through tensor maps over the packed rows, the general one row by row.
    torch.manual_seed(5)
    lens_q, lens_k = [1, 300, 129, 700], [5, 300, 400, 1000]
    cu_q = torch.tensor([0] + list(itertools.accumulate(lens_q)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(itertools.accumulate(lens_k)), dtype=torch.int32)
    q = torch.randn(sum(lens_q), 4, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(sum(lens_k), 2, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(sum(lens_k), 2, d, device="cuda", dtype=torch.bfloat16)
    # ATTNKIT_CUDA_PERSISTENT_FWD=3: three CTAs walk the forward's work items (tiles past the
    # shorter sequences among them, passed over by the producer).
    was = os.environ.get("ATTNKIT_CUDA_PERSISTENT_FWD")
    for kw, ctas in itertools.product(
            [dict(), dict(causal=True), dict(window=(100, 0)),
             dict(score_mod=attnkit.score_mods.Softcap(20.0))], [None, "3"]):
        if ctas is None:
            os.environ.pop("ATTNKIT_CUDA_PERSISTENT_FWD", None)
        else:
            os.environ["ATTNKIT_CUDA_PERSISTENT_FWD"] = ctas
        try:
            out, lse = attnkit.attention(q, k, v, cu_seqlens_q=cu_q.cuda(),
                                         cu_seqlens_kv=cu_k.cuda(), return_lse=True, **kw)
        finally:
            os.environ.pop("ATTNKIT_CUDA_PERSISTENT_FWD", None)
            if was is not None:
                os.environ["ATTNKIT_CUDA_PERSISTENT_FWD"] = was
        ref, ref_lse = attnkit.attention(q.cpu().float(), k.cpu().float(), v.cpu().float(),
                                         cu_seqlens_q=cu_q, cu_seqlens_kv=cu_k, return_lse=True, **kw)
        err = (out.cpu().float() - ref).norm() / ref.norm()
        assert err < 1e-2, (kw, float(err))
        assert torch.allclose(lse.cpu(), ref_lse, atol=2e-3, rtol=1e-3), kw


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("d", [64, 128])
def test_cuda_backward_matches_the_cpu(d):
    # Autograd on CUDA tensors (the CUDA backward) against the same on float32 CPU copies: packed
    # uneven sequences, GQA, and the fast (causal, window) and general (softcap, sink, gate) paths.
    torch.manual_seed(7)
    lens_q = [1, 300, 129, 200]
    sinks = torch.randn(4)
    gate = torch.randn(sum(lens_q), 4, d)
    _packed_grads_match(lens_q, [5, 300, 400, 257], d, [
        dict(), dict(causal=True), dict(window=(100, 0)),
        dict(causal=True, score_mod=attnkit.score_mods.Softcap(20.0)),
        dict(sinks=sinks), dict(causal=True, gate=gate)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_backward_with_a_sequence_without_keys():
    # A packed sequence with no keys (cu_seqlens need only be non-decreasing): its rows weigh
    # nothing, and the backward's CTAs past its keys still count themselves for the conversion of
    # its group's dq inside the kernel (their early exit converts it).
    torch.manual_seed(9)
    _packed_grads_match([3, 130, 64], [5, 0, 200], 64, [dict(), dict(causal=True)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_packed_rows_past_the_sequences():
    # cu_seqlens need only be non-decreasing and may end before the packed tensors do: every
    # sequence may lack keys, or queries, and rows past the last sequence are padding. The
    # sequences' outputs are the CPU's (no key: zeros, LSE -inf); every gradient is the CPU's
    # (padding rows' zero) on the band, table (chunked) and general (relative buckets) paths.
    # (Calls with no pair at all launched empty grids and failed; padding rows' gradients were
    # left unwritten.)
    torch.manual_seed(11)
    table = torch.randn(4, 8)
    for lens_q, lens_k in [([3, 130, 5], [0, 0, 0]), ([0, 0], [70, 4]), ([9, 70], [40, 3])]:
        cu_q = torch.tensor([0] + list(itertools.accumulate(lens_q)), dtype=torch.int32)
        cu_k = torch.tensor([0] + list(itertools.accumulate(lens_k)), dtype=torch.int32)
        nq = sum(lens_q)
        base = [torch.randn(nq + 2, 4, 64), torch.randn(sum(lens_k) + 3, 2, 64),
                torch.randn(sum(lens_k) + 3, 2, 64)]
        for case in ["band", "causal", "table", "general"]:
            res = []
            for dev, dt in [("cuda", torch.bfloat16), ("cpu", torch.float32)]:
                kw = {"band": {}, "causal": dict(causal=True),
                      "table": dict(mask=attnkit.masks.Chunked(16)),
                      "general": dict(score_mod=attnkit.score_mods.RelativeBuckets(
                          table.to(dev), num_buckets=8, max_distance=16))}[case]
                x = [t.detach().to(dev, dt).clone().requires_grad_() for t in base]
                out, lse = attnkit.attention(*x, cu_seqlens_q=cu_q.to(dev),
                                             cu_seqlens_kv=cu_k.to(dev), return_lse=True, **kw)
                go = torch.cos(torch.arange(out.numel(), dtype=torch.float32)).reshape(out.shape)
                out.backward(go.to(dev, out.dtype))
                res.append([out[:nq].float().cpu(), lse[:, :nq].float().cpu()] +
                           [t.grad.float().cpu() for t in x])
            for g, ref in zip(*res):  # infinities (LSE) where the CPU's, the rest within 2%
                fin = torch.isfinite(ref)
                assert g.shape == ref.shape and torch.equal(torch.isfinite(g), fin), (lens_k, case)
                assert torch.equal(g[~fin], ref[~fin]), (lens_k, case)
                err = (g[fin] - ref[fin]).norm()
                assert err <= 2e-2 * float(ref[fin].norm()), (lens_k, case, float(err))
            if max(lens_k) == 0 or max(lens_q) == 0:  # no pair: zeros, LSE -inf
                assert not res[0][0].any() and bool((res[0][1] == -math.inf).all())
                assert not any(g.any() for g in res[0][2:]), (lens_k, case)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_call_from_a_new_thread():
    # A thread that has made no CUDA runtime call has no current context, which the driver's
    # tensor-map encoder needs: the call makes its device's context current first (it refused
    # such calls as "q: the copy engine (TMA) cannot address it").
    torch.manual_seed(12)
    x = [torch.randn(2, 4, 200, 64, device="cuda", dtype=torch.bfloat16).requires_grad_()
         for _ in range(3)]
    go = torch.randn(2, 4, 200, 64, device="cuda", dtype=torch.bfloat16)

    def run():
        out = attnkit.attention(*x, causal=True)
        return [out.detach().clone()] + list(torch.autograd.grad(out, x, go))

    def in_thread(res):
        try:
            res.append(run())
        except Exception as e:  # noqa: BLE001 (reported by the main thread)
            res.append(e)

    want, got = run(), []
    t = threading.Thread(target=in_thread, args=(got,))
    t.start()
    t.join(timeout=120)
    assert not t.is_alive() and got, "the thread's call did not return"
    assert not isinstance(got[0], Exception), got[0]
    assert torch.equal(got[0][0], want[0])
    for g, ref in zip(got[0][1:], want[1:]):
        assert (g.float() - ref.float()).norm() <= 1e-2 * ref.float().norm()


def _packed_grads_match(lens_q, lens_k, d, cases):
    """The gradients of attnkit.attention on packed sequences (4 query heads, 2 kv heads) on
    CUDA in bf16 against float32 CPU copies, for each case's keyword arguments."""
    cu_q = torch.tensor([0] + list(itertools.accumulate(lens_q)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(itertools.accumulate(lens_k)), dtype=torch.int32)
    base = [torch.randn(sum(lens_q), 4, d), torch.randn(sum(lens_k), 2, d),
            torch.randn(sum(lens_k), 2, d)]
    for kw in cases:
        grads = []
        for dev, dt in [("cuda", torch.bfloat16), ("cpu", torch.float32)]:
            x = [t.detach().to(dev, dt).clone().requires_grad_() for t in base]
            extra = {}
            for name in ("sinks", "gate"):
                if name in kw:
                    extra[name] = kw[name].detach().to(dev, torch.float32).clone().requires_grad_()
            args = {**kw, **extra}
            cu = dict(cu_seqlens_q=cu_q.to(dev), cu_seqlens_kv=cu_k.to(dev))
            out = attnkit.attention(*x, **cu, **args)
            go = torch.cos(torch.arange(out.numel(), dtype=torch.float32)).reshape(out.shape)
            out.backward(go.to(dev, out.dtype))
            grads.append([t.grad.float().cpu() for t in x] +
                         [extra[n].grad.float().cpu() for n in sorted(extra)])
        for g, ref in zip(*grads):
            err = (g - ref).norm() / ref.norm()
            assert err < 2e-2, (sorted(kw), float(err))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", [c for c in _cases(6, 2, 3) if c != "block_map"])
def test_cuda_extras_gradients_match_the_cpu(name):
    # Every learnable extra of the gradcheck cases (bias, sinks, ALiBi slopes, relative table,
    # forget gate, low-rank factors, sigmoid beta, ReLA gain, gate) through autograd on CUDA
    # (bf16 q, k, v; fp32 extras) against the same on float32 CPU copies of the bf16 inputs.
    torch.manual_seed(11)
    n, h, d = 150, 2, 64
    kw = _cases(n, h, d)[name]()
    leaves = list(_leaves(kw))
    base = [torch.randn(1, h, n, d).bfloat16().float() for _ in range(3)]
    grads = []
    for dev, dt in [("cuda", torch.bfloat16), ("cpu", torch.float32)]:
        x = [t.detach().to(dev, dt).requires_grad_() for t in base]
        moved = {id(t): (t.detach().to(dev, torch.float32).requires_grad_() if t.requires_grad
                         else t.to(dev)) for t in leaves}
        extras = [moved[id(t)] for t in leaves if t.requires_grad]
        out = attnkit.attention(*x, **_swap(kw, moved))
        go = torch.cos(torch.arange(out.numel(), dtype=torch.float32)).reshape(out.shape)
        out.backward(go.to(dev, out.dtype))
        grads.append([t.grad.float().cpu() for t in x + extras])
    for g, ref in zip(*grads):
        err = (g - ref).norm() / ref.norm()
        assert err < 3e-2, (name, float(err))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_bias_gradient_matches_the_cpu(dtype):
    # dbias in the bias's dtype: stored per pair when the bias has every batch element and head
    # (dense, and under a mask whose skipped tiles must read 0), summed through an fp32 scratch
    # when it is broadcast over the batch.
    torch.manual_seed(13)
    b, h, n, d = 2, 2, 200, 64
    base = [torch.randn(b, h, n, d).bfloat16().float() for _ in range(3)]
    ids = torch.tensor([0] * 70 + [1] * 130, dtype=torch.int32)
    for bias_b, mask in [(b, None), (b, masks.Document(ids) & masks.Causal()), (1, masks.Causal())]:
        bias = torch.randn(bias_b, h, n, n).to(dtype).float()
        grads = []
        for dev, dt, bdt in [("cuda", torch.bfloat16, dtype), ("cpu", torch.float32, torch.float32)]:
            x = [t.detach().to(dev, dt).requires_grad_() for t in base]
            bt = bias.detach().to(dev, bdt).requires_grad_()
            m = None if mask is None else _swap(mask, {id(ids): ids.to(dev)})
            out = attnkit.attention(*x, mask=m, score_mod=score_mods.Bias(bt))
            go = torch.cos(torch.arange(out.numel(), dtype=torch.float32)).reshape(out.shape)
            out.backward(go.to(dev, out.dtype))
            assert bt.grad.dtype == bdt
            grads.append([t.grad.float().cpu() for t in x + [bt]])
        for g, ref in zip(*grads):
            err = (g - ref).norm() / ref.norm()
            assert err < 3e-2, (bias_b, mask is not None, float(err))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("qdt,bdt", [(torch.bfloat16, torch.bfloat16),
                                     (torch.bfloat16, torch.float32),
                                     (torch.float16, torch.float16)])
def test_cuda_bias_of_the_lowest_value(qdt, bdt):
    # An additive mask of the bias dtype's lowest value (Hugging Face's): on CUDA a score below
    # -FLT_MAX / log2(e) counts as masked (DESIGN.md, numerics), so rows of nothing else give
    # O = 0 and LSE -inf where the CPU weighs their keys evenly; never NaN (the general flavor,
    # an fp32 bias, gave NaN: -max * log2(e) overflowed). fp16's lowest (-65504) is an ordinary
    # score. The other rows, and every gradient with those rows' upstream gradient 0, are the
    # CPU's.
    torch.manual_seed(17)
    b, h, n, d = 1, 2, 200, 64
    base = [torch.randn(b, h, n, d).to(qdt).float() for _ in range(3)]
    low = torch.finfo(bdt).min
    masked = low < -3.4028234e38 / 1.4426950408889634
    bias = torch.randn(b, h, n, n).to(bdt).float()
    bias[:, :, :10, :] = low  # rows that see nothing but the lowest value
    bias[:, :, 10:, 150:] = low  # keys masked off the other rows
    go = torch.cos(torch.arange(b * h * n * d, dtype=torch.float32)).reshape(b, h, n, d)
    go[:, :, :10] = 0
    res = []
    for dev, dt, bt_dt in [("cuda", qdt, bdt), ("cpu", torch.float32, torch.float32)]:
        x = [t.detach().to(dev, dt).requires_grad_() for t in base]
        bt = bias.detach().to(dev, bt_dt).requires_grad_()
        out, lse = attnkit.attention(*x, score_mod=score_mods.Bias(bt), return_lse=True)
        out.backward(go.to(dev, out.dtype))
        res.append([t.double().cpu() for t in [out, lse] + [t.grad for t in x + [bt]]])
    cuda, cpu = res
    assert all(bool(torch.isfinite(g).all()) for g in cuda[:1] + cuda[2:])
    first = 10 if masked else 0
    if masked:
        assert not cuda[0][:, :, :10].any() and bool((cuda[1][:, :, :10] == -math.inf).all())
    for name, g, ref in zip(["out", "lse", "dq", "dk", "dv", "dbias"], cuda, cpu):
        if name in ("out", "lse"):
            g, ref = g[:, :, first:], ref[:, :, first:]
        assert bool(torch.isfinite(g).all()), name
        err = ((g - ref).abs() / ref.abs().clamp_min(1.0)).max() if name == "lse" else \
            (g - ref).norm() / ref.norm()
        assert err < 3e-2, (name, float(err))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_kernel_length_scale_backward():
    # The normalized kernel with a length scale (per-row log of the allowed keys) under a causal
    # mask: CUDA's gradients against the CPU path's on the same bf16 inputs.
    torch.manual_seed(5)
    q, k, v = (torch.randn(1, 2, 150, 64, dtype=torch.bfloat16) for _ in range(3))
    go = torch.randn(1, 2, 150, 64, dtype=torch.bfloat16)
    norm = attnkit.normalizers.Kernel("relu", 2.0, length_scale=True)
    grads = []
    for device in ("cpu", "cuda"):
        xs = [t.detach().to(device).requires_grad_() for t in (q, k, v)]
        attnkit.attention(*xs, normalizer=norm, causal=True).backward(go.to(device))
        grads.append([x.grad.float().cpu() for x in xs])
    for a, b in zip(*grads):
        assert float((a - b).norm() / b.norm()) < 3e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("grid", [(16, 48), (14, 30)])
def test_cuda_grid_neighborhood_matches_the_cpu(grid):
    # A 2-D neighborhood on grid tiles (where the build has ATTNKIT_CUDA_GRID_TILES): a grid of
    # whole 8 x 16 patches, and one whose last patches reach past it; BNHD and GQA: output and
    # LSE against the CPU, then gradients.
    torch.manual_seed(13)
    n = grid[0] * grid[1]
    mask = masks.Neighborhood(grid, kernel=(7, 11), causal=(True, False))
    q = torch.randn(2, n, 4, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, n, 2, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    out, lse = attnkit.attention(q, k, v, mask=mask, layout="bnhd", return_lse=True)
    ref, ref_lse = attnkit.attention(*(t.detach().cpu().float() for t in (q, k, v)), mask=mask,
                                     layout="bnhd", return_lse=True)
    assert float((out.detach().cpu().float() - ref).norm() / ref.norm()) < 1e-2
    assert torch.allclose(lse.cpu(), ref_lse, atol=2e-2, rtol=1e-2)
    out.backward(torch.ones_like(out))
    assert all(t.grad is not None and torch.isfinite(t.grad.float()).all() for t in (q, k, v))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", ["document", "neighborhood"])
def test_cuda_mask_cache(name, monkeypatch):
    # attnkit.MaskCache: the tables built once and reused give the outputs and gradients of
    # tables built per call; the backward keeps an entry of its own; another mask is refused.
    # The neighborhood's forward through its block table (this 32 x 24 grid takes grid tiles,
    # which need no table, since session 31).
    monkeypatch.setenv("ATTNKIT_CUDA_GRID", "0")
    torch.manual_seed(9)
    n = 32 * 24
    q, k, v = (torch.randn(2, 4, n, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    if name == "document":
        lengths = torch.tensor([100, 250, 18, 300, 100], device="cuda")  # n tokens
        mask = masks.Document(torch.repeat_interleave(
            torch.arange(5, device="cuda", dtype=torch.int32), lengths))
    else:
        mask = masks.Neighborhood((32, 24), kernel=(7, 9))
    go = torch.randn_like(q)
    cache = attnkit.MaskCache()
    results = []
    for c in (None, cache, cache):
        out = attnkit.attention(q, k, v, mask=mask, mask_cache=c)
        grads = torch.autograd.grad(out, (q, k, v), go)
        results.append((out, *grads))
    assert cache.entries == 2 and cache.bytes > 0
    for a, b in zip(results[0], results[2]):
        assert float((a.float() - b.float()).abs().max()) <= 1e-2 * float(a.float().abs().max())
    # The forward with the tables it built and with the ones it reused: bit for bit.
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][0], results[2][0])
    # Another problem shape (one batch element) with the same cache: an entry of its own.
    with torch.no_grad():
        one = attnkit.attention(q[:1], k[:1], v[:1], mask=mask, mask_cache=cache)
    assert cache.entries == 3
    assert torch.equal(one, results[0][0][:1])
    with pytest.raises(ValueError, match="mask_cache"):
        attnkit.attention(q, k, v, mask=mask, causal=True, mask_cache=cache)
    cache.clear()
    assert cache.entries == 0
    attnkit.attention(q, k, v, mask=mask, causal=True, mask_cache=cache)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_errors_name_the_rule():
    q = torch.randn(1, 2, 16, 64, device="cuda")  # fp32: CPU only
    with pytest.raises(TypeError, match="bf16 or fp16"):
        attnkit.attention(q, q, q)
    qb = q.bfloat16().requires_grad_()
    with pytest.raises(TypeError, match="on cpu but q is on cuda"):
        attnkit.attention(qb.detach(), qb.detach().cpu(), qb.detach())
