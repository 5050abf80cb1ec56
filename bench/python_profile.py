"""Where the PyTorch path's per-call time goes (tiny CPU input, requires_grad): cProfile of
attnkit.attention, top functions by own time. Usage: PYTHONPATH=build/python python3 bench/python_profile.py"""
import cProfile
import pstats

import torch

import attnkit

torch.set_num_threads(1)
q, k, v = (torch.randn(1, 1, 16, 64, requires_grad=True) for _ in range(3))
for _ in range(200):
    attnkit.attention(q, k, v, threads=1)
prof = cProfile.Profile()
prof.enable()
for _ in range(2000):
    attnkit.attention(q, k, v, threads=1)
prof.disable()
pstats.Stats(prof).sort_stats("tottime").print_stats(18)
