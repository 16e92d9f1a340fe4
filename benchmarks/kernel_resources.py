"""Registers, spills, occupancy and the static SASS instruction mix of the selective-scan kernels.

    python benchmarks/kernel_resources.py --shape=4x4096x4096 --dtype=bfloat16

Needs a CUDA GPU, `ptxas` and `cuobjdump` (the CUDA toolkit). Runs `profile_selective_scan.py` with
XLA dumping its PTX, assembles each scan kernel with `ptxas -v` for sm_90 (the registers and
spills it reports are those of the kernel XLA runs, up to ptxas version) and disassembles it.
Occupancy: warps per SM allowed by the registers (65,536 per SM, allocated per warp in units of
256; at most 64 warps and 32 blocks per SM) against the warps the grid offers per SM (programs x
warps per program / 132 SMs). The instruction counts are static (the tile loop's body, with its 16
states unrolled, is almost all of the code), so they are a mix, not a dynamic count.
"""

from __future__ import annotations

import argparse
import collections
import glob
import importlib
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SMS, REGS_PER_SM, MAX_WARPS, MAX_BLOCKS = 132, 65536, 64, 32
CLASSES = {  # SASS opcode (before the first '.') -> what it is
    "MUFU": "special function", "SHFL": "shuffle", "FFMA": "fp32", "FMUL": "fp32", "FADD": "fp32",
    "FSEL": "select", "SEL": "select", "FSETP": "compare", "ISETP": "compare", "LDG": "global load",
    "STG": "global store", "LDS": "shared", "STS": "shared", "BAR": "barrier", "BRA": "branch",
    "STL": "local (spill)", "LDL": "local (spill)", "F2F": "convert", "PRMT": "convert", "IMAD": "integer",
    "IADD3": "integer", "LEA": "integer", "MOV": "move",
}
SASS_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")  # `/*0050*/ @!P0 FFMA ...`


def _tool(name):
    found = shutil.which(name) or shutil.which(name, path="/usr/local/cuda/bin")
    if not found:
        raise SystemExit(f"{name} not found: this script needs the CUDA toolkit (ptxas, cuobjdump) on PATH")
    return found


def _warps_allowed(regs, warps_per_block):
    per_warp = math.ceil(regs * 32 / 256) * 256
    blocks = min(MAX_BLOCKS, (REGS_PER_SM // per_warp) // warps_per_block, MAX_WARPS // warps_per_block)
    return blocks * warps_per_block


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="4x4096x4096")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--kernels", default="selective_scan", help="regex on the PTX entry names")
    p.add_argument("--keep", default="", help="directory to copy the PTX and SASS of the kernels into")
    args = p.parse_args()
    ptxas, cuobjdump = _tool("ptxas"), _tool("cuobjdump")
    dump = tempfile.mkdtemp(prefix="scan_dump_")
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump}".strip())
    subprocess.run([sys.executable, os.path.join(here, "profile_selective_scan.py"), f"--shape={args.shape}",
                    f"--dtype={args.dtype}"], env=env, check=True)

    fused = importlib.import_module("pallas_kernels.selective_scan.selective_scan")
    batch, seq, width = (int(x) for x in args.shape.split("x"))
    itemsize = 2 if args.dtype == "bfloat16" else 4
    k = fused.default_channel_major_tuning(batch, seq, width, 32, itemsize)
    launch = {  # kernel-name fragment -> (programs, warps per program); fwd-only first: it is launched first
        "fwd_only": (batch * width // k["fwd_only_block_d"], k["fwd_only_warps"]),
        "fwd": (batch * width // k["fwd_block_d"], k["fwd_warps"]),
        "bwd": (batch * width // k["bwd_block_d"], k["bwd_warps"]),
    }
    print("| kernel (PTX entry) | registers | spill bytes (st/ld) | grid warps per SM | warps per SM allowed by "
          "registers | resident warps per SM | static SASS instructions | mix |")
    print("|---|---|---|---|---|---|---|---|")
    fwd_seen, entries, matched = 0, [], 0
    for ptx in sorted(glob.glob(os.path.join(dump, "*.ptx"))):
        text = open(ptx).read()
        for entry in re.findall(r"\.entry\s+(\w+)", text):
            entries.append(entry)
            if not re.search(args.kernels, entry):
                continue
            matched += 1
            cubin = os.path.join(dump, entry + ".cubin")
            assembled = subprocess.run([ptxas, "-arch=sm_90", "-v", f"--entry={entry}", ptx, "-o", cubin],
                                       capture_output=True, text=True)
            if assembled.returncode:
                print(f"| {entry} | ptxas failed: {assembled.stderr.strip()[:300]} |||||||")
                continue
            report = assembled.stderr
            regs = int(re.search(r"Used (\d+) registers", report).group(1))
            spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
            sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True).stdout
            ops = collections.Counter(m.split(".")[0] for m in SASS_OPCODE.findall(sass))
            mix = collections.Counter()
            for op, count in ops.items():
                mix[CLASSES.get(op, "other")] += count
            if "bwd" in entry:
                kind = "bwd"
            else:  # both forwards share one name; the forward-only call is compiled (dumped) first
                kind = "fwd_only" if fwd_seen == 0 else "fwd"
                fwd_seen += 1
            programs, warps = launch[kind]
            offered = programs * warps / SMS
            allowed = _warps_allowed(regs, warps)
            total = sum(ops.values())
            mix_text = ", ".join(f"{name} {n}" for name, n in mix.most_common(8))
            print(f"| {entry} ({kind}: {programs} programs x {warps} warps) | {regs} | "
                  f"{spill.group(1)}/{spill.group(2)} | {offered:.1f} | {allowed} | {min(offered, allowed):.1f} | "
                  f"{total} | {mix_text} |", flush=True)
            if args.keep:
                os.makedirs(args.keep, exist_ok=True)
                open(os.path.join(args.keep, f"{kind}.sass"), "w").write(sass)
    if not matched:
        print(f"no PTX entry matched --kernels={args.kernels!r}; entries: {sorted(set(entries))}")


if __name__ == "__main__":
    main()

