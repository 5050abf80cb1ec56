"""Per-call overhead of the Python entry on a tiny CPU input (B=1, H=1, N=16, d=64), against
the C++ call itself and, with PyTorch, against an empty torch.library custom op with autograd.
Prints medians in microseconds. Usage: PYTHONPATH=build/python python3 bench/python_overhead.py
"""
import statistics
import time

import numpy as np

import attnkit
from attnkit import _ext


def median_us(f, n=2000, rounds=7):
    for _ in range(200):
        f()
    meds = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        meds.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(meds)


def main():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 1, 16, 64)).astype(np.float32) for _ in range(3))
    out = np.empty_like(q)
    spec = {}  # what attnkit.attention passes for plain softmax attention
    rows = []
    ext = median_us(lambda: _ext.forward(q, k, v, out, None, spec, 1))
    noop = median_us(_ext.noop)
    numpy_path = median_us(lambda: attnkit.attention(q, k, v, threads=1))
    cpp = statistics.median(_ext.cpp_forward_us(q, k, v, out, spec, 1, 2000) for _ in range(7))
    rows.append(("C++ attention_forward alone (timed in C++)", cpp))
    rows.append(("binding, no work (_ext.noop)", noop))
    rows.append(("C++ call through the binding (_ext.forward)", ext))
    rows.append(("attnkit.attention, NumPy", numpy_path))
    rows.append(("  NumPy path above the C++ call (target < 10)", numpy_path - cpp))
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        torch.set_num_threads(1)
        tq, tk, tv = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))

        @torch.library.custom_op("attnkit_bench::empty", mutates_args=())
        def empty(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return torch.empty_like(a)

        empty.register_fake(lambda a, b, c: torch.empty_like(a))
        empty.register_autograd(lambda ctx, g: (g, g, g), setup_context=lambda ctx, inputs, output: None)
        t_empty = median_us(lambda: empty(tq, tk, tv), n=500)
        t_ak = median_us(lambda: attnkit.attention(tq, tk, tv, threads=1), n=500)
        with torch.no_grad():
            t_ak_ng = median_us(lambda: attnkit.attention(tq, tk, tv, threads=1), n=500)
        from attnkit import _spec
        text, tensors, _ = _spec.encode({})
        t_op = median_us(lambda: torch.ops.attnkit.attention(tq, tk, tv, text, tensors, 1), n=500)
        rows.append(("empty torch.library op with autograd", t_empty))
        rows.append(("torch.ops.attnkit.attention (the custom op)", t_op))
        rows.append(("attnkit.attention, PyTorch (requires_grad)", t_ak))
        rows.append(("attnkit.attention, PyTorch (no_grad)", t_ak_ng))
        rows.append(("  PyTorch path above the C++ call", t_ak - cpp))
        rows.append(("  ratio to the empty op (target <= 1.5)", (t_ak - cpp) / t_empty))
    for name, us in rows:
        print(f"{name:48s} {us:10.2f}" + ("" if "ratio" in name else " us"))


if __name__ == "__main__":
    main()
