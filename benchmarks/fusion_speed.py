"""Fusion speed and memory: `coldfusion merge` vs `mergekit-yaml` vs a naive torch script.

N = 2, 4, 8, 16 MiniLM-sized checkpoints (the bundled MiniLM body, each nudged by its
own noise), methods linear / task_arithmetic / ties, all in the same run:

- whole-command wall time (median of `--repeats` alternated runs) and peak RSS of each
  tool as a subprocess (os.wait4), and the same tool's idle import footprint, so memory
  can be read above that baseline;
- our fusion itself (in-process, streaming) against the time to just read the inputs once;
- agreement of our output with mergekit's (max absolute difference; entries beyond 1e-5,
  and for TIES how many of those are not explained by a magnitude tie at the trim cut).

mergekit lives in its own environment (`--mergekit`, default benchmarks/.env, made by
`python3 -m venv benchmarks/.env && benchmarks/.env/bin/pip install torch==2.13.0 &&
benchmarks/.env/bin/pip install -c requirements/constraints.txt mergekit==0.1.5`).
Targets: command time <= 0.5x mergekit's; fusion <= 2x read-once; peak memory above
baseline <= 3x one model. Prints one JSON line per measurement. `--fusion-only --methods ties
ties_plain` times TIES's compiled loops against its plain-torch path (no numba).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
OURS = {"linear": ("average", {}), "task_arithmetic": ("task_arithmetic", {"normalize": True}),
        "ties": ("ties", {"density": 0.2, "normalize": True})}
# TIES in plain torch (what runs without numba), for `--fusion-only`: is the compiled path worth its dependency?
PLAIN = {"ties_plain": "ties"}
MB = 1024 * 1024


# A tiny interpreter starts each measured command: a child forked straight from this
# benchmark (torch loaded, ~500 MB) would count that image in its peak RSS.
LAUNCHER = """
import json, os, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(proc.pid, 0)
print(json.dumps({"seconds": time.perf_counter() - start, "maxrss_kb": usage.ru_maxrss,
                  "code": os.waitstatus_to_exitcode(status)}))
"""


def measured(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one command, run by a small launcher process."""
    with tempfile.TemporaryFile() as err:
        out = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, *cmd], stdout=subprocess.PIPE, stderr=err,
                             env=env, check=True).stdout
        result = json.loads(out.decode().strip().splitlines()[-1])
        if result["code"] != 0:
            err.seek(0)
            raise RuntimeError(f"{cmd[:3]} failed:\n{err.read().decode()[-3000:]}")
    return result["seconds"], result["maxrss_kb"] / 1024  # ru_maxrss is in KiB on Linux


def make_inputs(root: Path, n: int) -> tuple[Path, list[Path]]:
    from transformers import AutoModel

    from coldfusion.models.names import default_model_dir

    base = root / "base"
    if not base.exists():
        shutil.copytree(default_model_dir(), base)
    model = AutoModel.from_pretrained(base)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dirs = []
    for i in range(n):
        d = root / f"ft{i:02d}"
        dirs.append(d)
        if (d / "model.safetensors").exists():
            continue
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for k, p in model.state_dict().items():
                if p.is_floating_point():
                    p.copy_(state[k] + 0.01 * torch.randn(p.shape, generator=g))
        model.save_pretrained(d)
    return base, dirs


def write_configs(root: Path, method: str, base: Path, dirs: list[Path]) -> tuple[Path, Path]:
    ours_method, params = OURS[method]
    ours = {"method": ours_method, "params": params, "models": [{"model": str(d)} for d in dirs],
            "output": str(root / "out-ours"), "overwrite": True}
    theirs = {"merge_method": method, "dtype": "float32",
              "models": [{"model": str(d), "parameters": {"weight": 1.0, **({"density": 0.2} if method == "ties"
                                                                                 else {})}} for d in dirs]}
    if method != "linear":
        ours["base_model"] = theirs["base_model"] = str(base)
        theirs["parameters"] = {"normalize": True}
    (root / "ours.yaml").write_text(yaml.safe_dump(ours))
    (root / "mergekit.yaml").write_text(yaml.safe_dump(theirs))
    return root / "ours.yaml", root / "mergekit.yaml"


def read_once(files: list[Path]) -> float:
    """Every input byte read once (from the page cache, like the merges that just ran)."""
    start = time.perf_counter()
    for f in files:
        f.read_bytes()
    return time.perf_counter() - start


def our_fusion_seconds(method: str, base: Path, dirs: list[Path]) -> float:
    """Every fused value computed (and dropped: the command writes them; this is the fusion alone)."""
    from contextlib import ExitStack

    from coldfusion.fusion import ties
    from coldfusion.fusion.streaming import fuse_stream
    from coldfusion.io.tensorfile import SafetensorsReader

    ours_method, params = OURS[PLAIN.get(method, method)]
    ties.compiled.cache_clear()
    compiled = ties.compiled
    if method in PLAIN:
        ties.compiled = lambda: False
    start = time.perf_counter()
    with ExitStack() as stack:
        readers = [stack.enter_context(SafetensorsReader([d / "model.safetensors"])) for d in dirs]
        base_reader = stack.enter_context(SafetensorsReader([base / "model.safetensors"]))
        try:
            for _ in fuse_stream(readers, ours_method, base=base_reader, **params):
                pass
        finally:
            ties.compiled = compiled
    return time.perf_counter() - start


def fusion_and_read_once(method: str, base: Path, dirs: list[Path], repeats: int) -> dict:
    """Read-once and fusion seconds, measured alternately in this process, after one untimed
    fusion that loads the compiled TIES loops (their load is in the command times). The
    ratio is the median of each round's fusion / read-once: the machine's load drifts, and
    a round's two measurements see the same load."""
    our_fusion_seconds(method, base, dirs[:1])
    inputs = [d / "model.safetensors" for d in dirs] + ([base / "model.safetensors"] if method != "linear" else [])
    pairs = [(read_once(inputs), our_fusion_seconds(method, base, dirs)) for _ in range(repeats)]
    ratios = sorted(f / r for r, f in pairs)
    return {"fusion_seconds": round(statistics.median(f for _, f in pairs), 3),
            "read_once_seconds": round(statistics.median(r for r, _ in pairs), 3),
            "fusion_over_read_once": round(statistics.median(ratios), 2),
            "fusion_over_read_once_range": [round(ratios[0], 2), round(ratios[-1], 2)]}


def compare(a_dir: Path, b_dir: Path, method: str, base: Path, dirs: list[Path]) -> dict:
    """Max absolute difference and entries that differ by more than 1e-5. For TIES, also the
    differing entries that are NOT where some model's task-vector magnitude ties with its
    cut: at such a tie mergekit keeps an arbitrary subset (its argsort is unstable), ours
    the lowest positions, so those entries legitimately differ."""
    from coldfusion.fusion.ties_kernel import magnitude_cut

    a = {k: v for f in a_dir.glob("*.safetensors") for k, v in load_file(f).items()}
    b = {k: v for f in b_dir.glob("*.safetensors") for k, v in load_file(f).items()}
    common = [k for k in a if k in b and a[k].is_floating_point()]
    differing = {k: ((a[k] - b[k]).abs() > 1e-5).flatten() for k in common}
    unexplained = sum(int(m.sum()) for m in differing.values())
    if method == "ties" and unexplained:
        base_sd = load_file(base / "model.safetensors")
        models = [load_file(d / "model.safetensors") for d in dirs]
        unexplained = 0
        for k, mask in differing.items():
            if not mask.any():
                continue
            at_tie = torch.zeros_like(mask)
            for m in models:
                delta = (m[k].float() - base_sd[k].float()).flatten()
                at_tie |= delta.abs() == magnitude_cut(delta, OURS["ties"][1]["density"]).value
            unexplained += int((mask & ~at_tie).sum())
    return {"max_abs_diff_vs_mergekit": max(float((a[k] - b[k]).abs().max()) for k in common),
            "tensors_compared": len(common), "entries_differing": sum(int(m.sum()) for m in differing.values()),
            "entries_differing_not_at_a_magnitude_tie": unexplained}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--methods", nargs="+", default=list(OURS), help=f"of {[*OURS, *PLAIN]} (ties_plain: with "
                   "--fusion-only)")
    p.add_argument("--mergekit", type=Path, default=HERE / ".env", help="the venv that has mergekit")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "coldfusion-fusion-bench")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="runs of each command (median time, max memory)")
    p.add_argument("--fusion-repeats", type=int, default=7, help="rounds of our fusion against reading once")
    p.add_argument("--fusion-only", action="store_true", help="only our fusion against reading the inputs once")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    ours_cmd = [sys.executable, "-m", "coldfusion", "merge"]
    # mergekit 0.1.5 needs a one-line fix to plan BERT merges at all (see mergekit_shim.py)
    theirs_cmd = [str(args.mergekit / "bin" / "python"), str(HERE / "mergekit_shim.py")]
    args.workdir.mkdir(parents=True, exist_ok=True)
    base, all_dirs = make_inputs(args.workdir, max(args.n))
    one_model_mb = (base / "model.safetensors").stat().st_size / MB
    # Start-up footprint of each tool (its imports); memory targets are read above it.
    baselines = {} if args.fusion_only else {  # (--fusion-only needs no other tool)
        "coldfusion": measured([sys.executable, "-c", "import coldfusion.cli, coldfusion.merge.run"], env)[1],
        "mergekit": measured([str(args.mergekit / "bin" / "python"), "-c",
                              "import mergekit.scripts.run_yaml, mergekit.merge, mergekit.plan"], env)[1],
        "naive": measured([sys.executable, "-c", "import torch, safetensors.torch"], env)[1],
    }
    print(json.dumps({"kind": "setup", "one_model_mb": round(one_model_mb, 1), "threads": args.threads,
                      "import_baseline_rss_mb": {k: round(v, 1) for k, v in baselines.items()}}), flush=True)
    for n in args.n:
        dirs = all_dirs[:n]
        files = [d / "model.safetensors" for d in dirs]
        for method in args.methods:
            if args.fusion_only:
                timing = fusion_and_read_once(method, base, dirs, args.fusion_repeats)
                print(json.dumps({"kind": "fusion", "n": n, "method": method, **timing}), flush=True)
                continue
            ours_cfg, theirs_cfg = write_configs(args.workdir, method, base, dirs)
            out_theirs, out_naive = args.workdir / "out-mergekit", args.workdir / "out-naive.safetensors"
            shutil.rmtree(out_theirs, ignore_errors=True)
            commands = {
                "coldfusion": [*ours_cmd, str(ours_cfg)],
                "mergekit": [*theirs_cmd, str(theirs_cfg), str(out_theirs), "--quiet"],
                "naive": [sys.executable, str(HERE / "naive_merge.py"), method, str(out_naive),
                          str(base / "model.safetensors"), *map(str, files)],
            }
            # The tools take turns, `--repeats` times: the machine's load drifts, so each
            # tool's median time is compared with the others' from the same rounds.
            samples = {system: [] for system in commands}
            for _ in range(args.repeats):
                for system, cmd in commands.items():
                    samples[system].append(measured(cmd, env))
            runs = {system: (statistics.median(t for t, _ in got), max(m for _, m in got))
                    for system, got in samples.items()}
            for system, (seconds, rss) in runs.items():
                above = rss - baselines[system]
                print(json.dumps({"kind": "command", "n": n, "method": method, "system": system,
                                  "seconds": round(seconds, 2), "runs": [round(t, 2) for t, _ in samples[system]],
                                  "peak_rss_mb": round(rss, 1),
                                  "peak_above_import_mb": round(above, 1),
                                  "memory_ratio_to_one_model": round(above / one_model_mb, 2)}), flush=True)
            timing = fusion_and_read_once(method, base, dirs, args.fusion_repeats)
            agreement = compare(args.workdir / "out-ours", out_theirs, method, base, dirs)
            ours_mem = (runs["coldfusion"][1] - baselines["coldfusion"]) / one_model_mb
            summary = {
                "kind": "summary", "n": n, "method": method,
                "time_ratio_vs_mergekit": round(runs["coldfusion"][0] / runs["mergekit"][0], 3),
                **timing,
                "memory_ratio": round(ours_mem, 2),
                **agreement,
            }
            summary["targets_met"] = {"time<=0.5x": summary["time_ratio_vs_mergekit"] <= 0.5,
                                      "fusion<=2x_read": summary["fusion_over_read_once"] <= 2,
                                      "memory<=3x": ours_mem <= 3,
                                      "agree<=1e-5": agreement["entries_differing_not_at_a_magnitude_tie"] == 0}
            print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
