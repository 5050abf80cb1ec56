#!/usr/bin/env bash
# The order of the instructions that matter in a kernel's SASS (tensor-core MMAs, their waits,
# local-memory spills, calls, barriers), runs of one opcode collapsed: where spills sit relative
# to the main loop's matrix multiplies. Usage: bash scripts/sass_summary.sh OBJECT NAME_PATTERN
set -euo pipefail
cuobjdump -sass "$1" | awk -v pat="$2" '/Function : /{f = ($0 ~ pat)} f' |
  grep -oE "HGMMA[.A-Z0-9x]*|LDL[.0-9]*|STL[.0-9]*|CALL[.A-Z]*|RET[.A-Z]*|WARPGROUP\.[A-Z]*|BAR\.[A-Z]*|SYNCS\.[A-Z.0-9]*|MUFU\.[A-Z0-9]*|BRA" |
  awk '{k = $1; if (k == prev) n++; else { if (prev != "") printf "%s x%d\n", prev, n; prev = k; n = 1 } }
       END { printf "%s x%d\n", prev, n }'
