"""Flower engine overhead: one small ColD Fusion run on the local engine and on Flower's
simulation runtime, same config, same machine, runs alternated.

Per-round wall time after the first round (the first pays for starting Ray and loading
the tasks), from each run's results.jsonl: `train_seconds` (contributors' training plus,
for Flower, sending the base out and the bodies back) and `iteration_seconds` (that plus
fusion and the contributors scoring the new base on their own tasks, for Flower an
evaluate round). Target: Flower at most 1.15x local. Also checks that both engines wrote
the same results.jsonl rows apart from timings (`rows_identical`). Prints one JSON line
per round and a summary line; each run is `coldfusion run` in its own process.

    python benchmarks/engine_overhead.py [--iterations 4] [--examples 160] [--repeats 2]
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
TASKS = ["tweet_sentiment", "bbc_topic", "movie_sentiment"]
TIMINGS = {"seconds", "train_seconds", "fuse_seconds", "iteration_seconds"}


def config(engine: str, args, out: Path) -> dict:
    return {
        "name": f"overhead-{engine}", "seed": 0, "threads": args.threads, "model": "default", "max_length": 64,
        "tasks": TASKS, "engine": engine,
        "loop": {"iterations": args.iterations, "examples_per_contributor": args.examples},
        "evaluation": {"train_examples": 200, "validation_examples": 100, "test_examples": 200},
        "output_dir": str(out),
    }


def run(engine: str, args, workdir: Path, repeat: int) -> list[dict]:
    out = workdir / f"{engine}-{repeat}"
    path = workdir / f"{engine}-{repeat}.yaml"
    path.write_text(yaml.safe_dump(config(engine, args, out)))
    subprocess.run([str(Path(sys.executable).with_name("coldfusion")), "run", str(path)], check=True,
                   stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in (out / f"overhead-{engine}" / "results.jsonl").read_text().splitlines()]


def without_timings(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iterations", type=int, default=4)
    p.add_argument("--examples", type=int, default=160, help="examples per contributor per round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="runs of each engine, alternated")
    p.add_argument("--out", type=Path, default=HERE / "results" / "engine_overhead.jsonl")
    args = p.parse_args()

    lines, rounds, identical = [], {"local": [], "flower": []}, []
    with tempfile.TemporaryDirectory(prefix="coldfusion-overhead-") as tmp:
        for repeat in range(args.repeats):
            results = {}
            for engine in ("local", "flower"):
                results[engine] = run(engine, args, Path(tmp), repeat)
                for row in (r for r in results[engine] if r["kind"] == "fusion"):
                    line = {"kind": "round", "engine": engine, "repeat": repeat, "iteration": row["iteration"],
                            "train_seconds": row["train_seconds"], "iteration_seconds": row["iteration_seconds"]}
                    print(json.dumps(line), flush=True)
                    lines.append(line)
                    if row["iteration"] > 1:
                        rounds[engine].append(line)
            identical.append(without_timings(results["local"]) == without_timings(results["flower"]))
    median = {e: {k: round(statistics.median(r[k] for r in rs), 2) for k in ("train_seconds", "iteration_seconds")}
              for e, rs in rounds.items()}
    summary = {"kind": "summary", "tasks": TASKS, "examples_per_contributor": args.examples,
               "threads": args.threads, "rounds_measured_per_engine": len(rounds["local"]),
               "median_local": median["local"], "median_flower": median["flower"],
               "round_ratio": round(median["flower"]["train_seconds"] / median["local"]["train_seconds"], 3),
               "iteration_ratio": round(median["flower"]["iteration_seconds"] / median["local"]["iteration_seconds"],
                                        3),
               "rows_identical": all(identical)}
    summary["target_met"] = summary["round_ratio"] <= 1.15
    print(json.dumps(summary), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(line) + "\n" for line in [*lines, summary]))


if __name__ == "__main__":
    main()
