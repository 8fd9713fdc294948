"""What one kernel boundary costs in a chain of small dependent launches (H100), and what a flag would save.

The decode step is a chain of ~260 dependent launches (8 a block). With programmatic dependent launch (PDL) each
kernel starts early, touches its constants, then waits in ``griddepcontrol.wait`` until the kernel before it has
completed and its memory is flushed. The question here: how long is that edge, against handing the data over with
a counter (the producer's programs each add 1 with release semantics after their stores; the consumer's programs
spin on an acquire load until it reaches the producer's program count, and never call griddepcontrol.wait)?

Chain: L launches, each of P programs. Program p of launch i reads its (BLOCK,) slice of the previous launch's
output, adds 1 and stores it (so every edge carries data). Variants, each captured in one CUDA graph:
  plain  no PDL (each launch starts when the one before it has completed)
  wait   PDL: launch_dependents first, then griddepcontrol.wait, then the read
  flag   PDL launch, launch_dependents first, no wait: spin until the previous launch's counter reaches P
The counters are zeroed by one memset node at the start of the graph; the result is checked (value L) each time.

    OUT=/tmp python3 -P benchmarks/experiments/pdl_handoff.py    # $OUT/pdl_handoff_h100.json
"""

import datetime
import json
import os
import statistics
from pathlib import Path

import torch
import triton
import triton.language as tl

GDC_LAUNCH = tl.constexpr("griddepcontrol.launch_dependents;\nmov.u32 $0, 0;")
GDC_WAIT = tl.constexpr("griddepcontrol.wait;\nmov.u32 $0, 0;")
LOAD_ACQUIRE = tl.constexpr("ld.acquire.gpu.global.u32 $0, [$1];")


@triton.jit
def _hop(src, dst, flag_in, flag_out, P_IN, BLOCK: tl.constexpr, MODE: tl.constexpr):
    """MODE 0 plain, 1 wait, 2 flag."""
    p = tl.program_id(0)
    offs = p * BLOCK + tl.arange(0, BLOCK)
    one = tl.full((1,), 0, tl.int32)
    if MODE >= 1:
        tl.inline_asm_elementwise(GDC_LAUNCH, "=r,r", [one], dtype=tl.int32, is_pure=False, pack=1)
    if MODE == 1:
        tl.inline_asm_elementwise(GDC_WAIT, "=r,r", [one], dtype=tl.int32, is_pure=False, pack=1)
    if MODE == 2:
        seen = tl.inline_asm_elementwise(LOAD_ACQUIRE, "=r,l", [flag_in + one * 0], dtype=tl.int32,
                                         is_pure=False, pack=1)
        while tl.max(seen, axis=0) < P_IN:
            seen = tl.inline_asm_elementwise(LOAD_ACQUIRE, "=r,l", [flag_in + one * 0], dtype=tl.int32,
                                             is_pure=False, pack=1)
        v = tl.load(src + offs, cache_modifier=".cg")
    else:
        v = tl.load(src + offs)
    tl.store(dst + offs, v + 1.0)
    if MODE == 2:
        tl.debug_barrier()  # every thread's store before the release
        tl.atomic_add(flag_out, 1, sem="release", scope="gpu")


def chain(mode, L, P, BLOCK, bufs, flags):
    flags.zero_()
    kw = {"launch_pdl": True} if mode >= 1 else {}
    for i in range(L):
        src, dst = bufs[i % 2], bufs[(i + 1) % 2]
        # launch 0 reads a flag nobody writes: give it P_IN 0 (it passes at once)
        _hop[(P,)](src, dst, flags[i], flags[i + 1], 0 if i == 0 else P, BLOCK=BLOCK, MODE=mode, num_warps=4, **kw)


def main():
    L = int(os.environ.get("L", "256"))
    res = dict(info=dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                         date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                         launches=L), rows=[])
    out = Path(os.environ.get("OUT", "/tmp")) / "pdl_handoff_h100.json"
    for P in (1, 16, 132):
        BLOCK = 1024
        bufs = [torch.zeros(P * BLOCK, device="cuda") for _ in range(2)]
        flags = torch.zeros(L + 1, dtype=torch.int32, device="cuda")
        graphs, correct = {}, {}
        for mode, name in ((0, "plain"), (1, "wait"), (2, "flag")):
            def run(mode=mode, P=P, BLOCK=BLOCK, bufs=bufs, flags=flags):
                bufs[0].zero_()
                chain(mode, L, P, BLOCK, bufs, flags)
            run()
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                run()
            g.replay()
            torch.cuda.synchronize()
            got = bufs[L % 2]
            correct[name] = bool(torch.all(got == L))  # every element went through the L launches
            graphs[name] = g
            if not correct[name]:
                print(f"P={P} {name}: WRONG result {got.min().item()}..{got.max().item()}")
        ms = {n: [] for n in graphs}
        for _ in range(5):
            for n, g in graphs.items():
                torch.cuda.synchronize()
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                for _ in range(10):
                    g.replay()
                e.record()
                e.synchronize()
                ms[n].append(s.elapsed_time(e) / 10)
        for n, v in ms.items():
            us = statistics.median(v) * 1e3 / L
            res["rows"].append(dict(programs=P, variant=n, us_per_launch=us, ms_per_chain=v, correct=correct[n]))
            print(f"P={P:3d} {n:5s} {us:6.3f} us per launch  (chain of {L}: {statistics.median(v):.3f} ms)")
        out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
