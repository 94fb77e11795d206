"""Bytes per contribution against accuracy: ColD Fusion under each contribution encoding.

The quick start's setting (bundled MiniLM, four real tasks, 640 examples per contributor
per iteration) for `--iterations` iterations, once per encoding, all in this run: `full`
(fp32 body), `delta` (fp16), `sparse` (2% of delta entries, by magnitude and by Fisher)
and `lora` (rank 8 on every attention and feed-forward linear layer, and rank 16 at twice
the learning rate). Each run goes
through `coldfusion run`; its results.jsonl gives the bytes each contribution sent and
the final base's linear-probe accuracy on the seen tasks. One JSON line per encoding,
then a summary: bytes relative to `full`, and points of accuracy against `full`.
Target: at least 20x fewer bytes than `full` with at most 0.5 points lost, for at least
one encoding. About 5 minutes per encoding on 2 quiet cores.

    python benchmarks/communication.py [--encodings full lora_r16_lr1e-3 ...] [--iterations 2] [--resume]
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
COLDFUSION = str(Path(sys.executable).with_name("coldfusion"))
TASKS = ["tweet_sentiment", "movie_sentiment", "election_tweets", "reuters_r8"]
ENCODINGS = {
    "full": {"kind": "full"},
    "delta_fp16": {"kind": "delta", "dtype": "float16"},
    "sparse_2pct_magnitude": {"kind": "sparse", "density": 0.02, "score": "magnitude"},
    "sparse_2pct_fisher": {"kind": "sparse", "density": 0.02, "score": "fisher"},
    "lora_r8_lr5e-4": {"kind": "lora", "lora": {"r": 8, "alpha": 16, "lr": 5e-4}},
    "lora_r16_lr1e-3": {"kind": "lora", "lora": {"r": 16, "alpha": 32, "lr": 1e-3}},
}


def emit(row: dict, out: Path) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    with open(out, "a") as f:
        f.write(line + "\n")


def run(name: str, encoding: dict, args, workdir: Path) -> dict:
    config = yaml.safe_load((HERE.parent / "configs" / "quickstart.yaml").read_text())
    config.update(name=name, tasks=TASKS, threads=args.threads, contribution=encoding, output_dir=str(workdir))
    config["loop"]["iterations"] = args.iterations
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    started = time.perf_counter()
    done = subprocess.run([COLDFUSION, "run", str(path)], capture_output=True, text=True, timeout=7200)
    if done.returncode:
        raise SystemExit(f"{name} failed: {done.stderr[-2000:]}")
    rows = [json.loads(line) for line in (workdir / name / "results.jsonl").read_text().splitlines()]
    accuracy = lambda it: 100 * statistics.fmean(  # noqa: E731
        r["accuracy"] for r in rows if r["kind"] == "probe" and r["iteration"] == it)
    contributions = [r for r in rows if r["kind"] == "contribution"]
    fusions = [r for r in rows if r["kind"] == "fusion"]
    return {"encoding": name, "settings": encoding, "iterations": args.iterations,
            "accuracy": round(accuracy(args.iterations), 2),
            "pretrained_accuracy": round(accuracy(0), 2),
            "bytes_per_contribution": round(statistics.fmean(r["bytes_sent"] for r in contributions)),
            "bytes_sent_per_iteration": [r["bytes_sent"] for r in fusions],
            "bytes_stored_per_iteration": [r["bytes_stored"] for r in fusions],
            "rejected": [r["rejected"] for r in fusions if r["rejected"]],
            "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--encodings", nargs="+", default=list(ENCODINGS), choices=list(ENCODINGS))
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=HERE / "results" / "communication.jsonl")
    p.add_argument("--resume", action="store_true",
                   help="take encodings already measured (same settings and iterations) from --out")
    args = p.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = {}
    if args.resume and args.out.exists():
        for line in args.out.read_text().splitlines():
            row = json.loads(line)
            if row["part"] == "run" and row["encoding"] in args.encodings and \
                    row["settings"] == ENCODINGS[row["encoding"]] and row["iterations"] == args.iterations:
                results[row["encoding"]] = {k: v for k, v in row.items() if k != "part"}
    with tempfile.TemporaryDirectory(prefix="coldfusion-communication-") as tmp:
        for name in args.encodings:
            if name not in results:
                results[name] = run(name, ENCODINGS[name], args, Path(tmp))
                emit({"part": "run", **results[name]}, args.out)
    if "full" not in results:
        return
    full = results["full"]
    summary = {name: {"fewer_bytes_than_full": round(full["bytes_per_contribution"] / r["bytes_per_contribution"], 1),
                      "points_vs_full": round(r["accuracy"] - full["accuracy"], 2)} for name, r in results.items()}
    met = [n for n, s in summary.items() if s["fewer_bytes_than_full"] >= 20 and s["points_vs_full"] >= -0.5]
    emit({"part": "summary", "iterations": args.iterations, "full_accuracy": full["accuracy"],
          "pretrained_accuracy": full["pretrained_accuracy"], "by_encoding": summary,
          "target_20x_within_half_a_point": met}, args.out)


if __name__ == "__main__":
    main()
