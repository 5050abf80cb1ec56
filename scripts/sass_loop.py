#!/usr/bin/env python3
"""A kernel's steady loop in its SASS: the innermost loop with exactly HGMMAS tensor-core
instructions, its size, its local-memory accesses (spills; the kernel's too), its forward
branches (the blocks a step may skip) and the instruction mix of the path that skips the given
address ranges.

Usage: python3 scripts/sass_loop.py CUBIN_OR_BINARY NAME_PATTERN HGMMAS [--skip A-B ...]
  NAME_PATTERN: a substring of the mangled kernel name (the first function that has it);
  --skip A-B: hex addresses, first and last instruction of a block the path does not execute
  (the printed branches give them: a dense row skips the bias, softcap and table blocks).
cuobjdump comes from the CUDA toolkit or PyPI's nvidia-cuda-cuobjdump (no GPU needed); set
CUOBJDUMP to its path where it is not on PATH. Its -sass needs nvdisasm on PATH too (the toolkit's,
or PyPI's nvidia-cuda-nvdisasm: both wheels put them in site-packages/nvidia/cu13/bin).
"""
import collections
import os
import re
import subprocess
import sys

MATH = ("FMNMX", "FMUL", "FADD", "FFMA", "MUFU", "F2FP", "HGMMA")


def function(path, pattern):
    tool = os.environ.get("CUOBJDUMP", "cuobjdump")
    sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True,
                          check=True).stdout
    for f in re.split(r"\n\s*Function : ", sass)[1:]:
        if pattern in f.split("\n", 1)[0]:
            return [(int(m.group(1), 16), m.group(2)) for m in
                    re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", f)]
    sys.exit(f"no function matching {pattern} in {path}")


def opcode(text):
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]


def main():
    args = sys.argv[1:]
    skips = []
    while "--skip" in args:
        k = args.index("--skip")
        a, b = args[k + 1].split("-")
        skips.append((int(a, 16), int(b, 16)))
        del args[k:k + 2]
    if len(args) != 3:
        sys.exit(__doc__)
    ins = function(args[0], args[1])
    want = int(args[2])
    at = {a: i for i, (a, _) in enumerate(ins)}
    best = None
    for i, (a, t) in enumerate(ins):
        m = re.search(r"BRA.*?0x([0-9a-f]+)", t)
        if m and int(m.group(1), 16) < a and int(m.group(1), 16) in at:
            j = at[int(m.group(1), 16)]
            n = sum("HGMMA" in x for _, x in ins[j:i + 1])
            if n == want and (best is None or i - j < best[1] - best[0]):
                best = (j, i)
    if best is None:
        sys.exit(f"no loop with {want} HGMMA")
    body = ins[best[0]:best[1] + 1]
    local = lambda part: sum(opcode(t).startswith(("LDL", "STL")) for _, t in part)
    print(f"loop {body[0][0]:#x}-{body[-1][0]:#x}: {len(body)} instructions, "
          f"{local(body)} LDL/STL (the kernel's: {local(ins)})")
    index = {a: i for i, (a, _) in enumerate(body)}
    for i, (a, t) in enumerate(body[:-1]):
        m = re.search(r"BRA.*?0x([0-9a-f]+)", t)
        if m and int(m.group(1), 16) > a and int(m.group(1), 16) in index:
            skipped = index[int(m.group(1), 16)] - i - 1
            print(f"  {a:#x} {t.strip()}: skips {skipped} ({body[i + 1][0]:#x}-"
                  f"{body[index[int(m.group(1), 16)] - 1][0]:#x})")
    path = [t for a, t in body if not any(lo <= a <= hi for lo, hi in skips)]
    mix = collections.Counter(opcode(t) for t in path)
    math = sum(n for k, n in mix.items() if k.startswith(MATH))
    uniform = sum(n for k, n in mix.items() if k.startswith("U") or k in ("S2UR", "R2UR"))
    print(f"path: {len(path)} instructions, {math} of softmax arithmetic and HGMMA, "
          f"{len(path) - math} other, {uniform} on the uniform datapath")
    print("  " + ", ".join(f"{k} {n}" for k, n in mix.most_common(24)))


if __name__ == "__main__":
    main()
