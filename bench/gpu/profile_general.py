"""Per-kernel GPU times of attnkit's masked paths (torch.profiler): the block table's passes
against the attention kernel, for the masked cases of bench.py, without and with a MaskCache.
Usage: PYTHONPATH=build-gpu/python python3 bench/gpu/profile_general.py"""
import torch
from torch.profiler import ProfilerActivity, profile

import attnkit

dev = "cuda"
b, h, d, n = 2, 16, 128, 8192
q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=torch.bfloat16) for _ in range(3))
docs = torch.tensor([0] * 3000 + [1] * 2000 + [2] * 3192, device=dev, dtype=torch.int32)
cases = {
    "document-causal": dict(mask=attnkit.masks.Causal() & attnkit.masks.Document(docs)),
    "neighborhood-2d": dict(mask=attnkit.masks.Neighborhood((64, 128), kernel=(13, 13))),
    "softcap": dict(score_mod=attnkit.score_mods.Softcap(30.0)),
}
# The same masks with their block tables built once (attnkit.MaskCache).
for name in ("document-causal", "neighborhood-2d"):
    cases[name + " cached"] = dict(cases[name], mask_cache=attnkit.MaskCache())
for name, kw in cases.items():
    for _ in range(3):
        attnkit.attention(q, k, v, **kw)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            attnkit.attention(q, k, v, **kw)
        torch.cuda.synchronize()
    print("==", name)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=60))
