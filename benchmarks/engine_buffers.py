"""Ablation: what the fusion engine's reused buffers buy (fusion/streaming.py).

The engine reads whole tensors (TIES's cut) into one buffer it keeps across tensors
(`hold`), and each worker thread reads its slices into a buffer of its own that it keeps
(`_thread_scratch`). This benchmark switches them off, one then both, and measures the
fusion's time against reading the inputs once (as benchmarks/fusion_speed.py does) and
the peak memory of a process that fuses (above what it held before fusing), for the
fusion_speed inputs (MiniLM bodies). Variants alternate within each round. One JSON line
per measurement.

    python benchmarks/engine_buffers.py --out benchmarks/results/engine_buffers.jsonl
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
VARIANTS = ("reused", "fresh_thread_buffers", "fresh_buffers")

# Run in a fresh process per measurement: peak RSS is per process.
CHILD = """
import json, re, sys, time
from contextlib import ExitStack
from pathlib import Path
import torch
torch.set_num_threads(int(sys.argv[4]))
from coldfusion.fusion import streaming
from coldfusion.io.tensorfile import SafetensorsReader
variant, method, root = sys.argv[1], sys.argv[2], Path(sys.argv[3])
dirs = [Path(d) for d in sys.argv[5:]]
if variant != "reused":  # every slice of every thread in a buffer of its own
    streaming._thread_scratch = lambda size: torch.empty(size)
if variant == "fresh_buffers":  # and every whole tensor too
    init = streaming.LazyTensors.__init__
    streaming.LazyTensors.__init__ = lambda self, r, name, span=None, scratch=None, workers=1: init(
        self, r, name, span, None, workers)
params = {"density": 0.2} if method == "ties" else {}
# this process's peak (VmHWM: unlike ru_maxrss, not inherited from the parent across exec)
hwm = lambda: int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
before = hwm()
with ExitStack() as stack:
    readers = [stack.enter_context(SafetensorsReader([d / "model.safetensors"])) for d in dirs]
    base = stack.enter_context(SafetensorsReader([root / "base" / "model.safetensors"]))
    start = time.perf_counter()
    for _ in streaming.fuse_stream(readers, method, base=base, **params):
        pass
    seconds = time.perf_counter() - start
peak = hwm()
print(json.dumps({"seconds": seconds, "growth_mb": (peak - before) / 1024}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[4, 16])
    p.add_argument("--methods", nargs="+", default=["average", "ties"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "coldfusion-fusion-bench")
    p.add_argument("--out", type=Path, help="append the lines here too")
    args = p.parse_args()
    sys.path.insert(0, str(HERE))
    from fusion_speed import make_inputs  # the same inputs as the fusion-speed benchmark

    torch.set_num_threads(args.threads)
    base, all_dirs = make_inputs(args.workdir, max(args.n))
    one_model_mb = (base / "model.safetensors").stat().st_size / 2**20
    for n in args.n:
        for method in args.methods:
            rows = {v: [] for v in VARIANTS}
            for _ in range(args.rounds):
                for variant in VARIANTS:
                    out = subprocess.run([sys.executable, "-c", CHILD, variant, method, str(args.workdir),
                                          str(args.threads), *map(str, all_dirs[:n])],
                                         capture_output=True, text=True, check=True)
                    rows[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
            for variant, got in rows.items():
                line = {"kind": "engine_buffers", "n": n, "method": method, "variant": variant,
                        "seconds": sorted(round(r["seconds"], 3) for r in got),
                        "peak_growth_mb": max(round(r["growth_mb"], 1) for r in got),
                        "peak_growth_over_one_model": round(max(r["growth_mb"] for r in got) / one_model_mb, 2)}
                print(json.dumps(line), flush=True)
                if args.out:
                    with args.out.open("a") as f:
                        f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
