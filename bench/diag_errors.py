"""Which error path of the binding works (diagnostic for a new platform): each case in a fresh
interpreter, so a crash names its case."""
import subprocess
import sys

CASES = {
    "nanobind_type_error": "attnkit.attention(q.astype(np.int64), q, q)",
    "status_value_error": "attnkit.attention(q, q, q, window=(-3, 0))",
    "inner_stride": "attnkit.attention(q[..., ::2], q[..., ::2], q[..., ::2])",
    "python_value_error": "attnkit.attention(q, q, q, normalizer='nope')",
}
for name, call in CASES.items():
    code = ("import numpy as np, attnkit\nq = np.random.rand(1, 2, 16, 8).astype(np.float32)\n"
            f"try:\n    {call}\nexcept Exception as e:\n    print(type(e).__name__, str(e)[:80])\n")
    r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], capture_output=True,
                       text=True)
    print(f"{name:22s} rc={r.returncode} {r.stdout.strip()} {r.stderr.strip()[-300:]}")
