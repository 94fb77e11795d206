"""Asynchronous against synchronous ColD Fusion, when contributors differ in speed.

Every arm serves a fresh repository of the same base with `coldfusion serve` and starts
the same contributors, one `coldfusion contribute-loop` process each, on built-in tasks;
a contributor's speed is the number of examples it trains on per round (a slow one has
more data), so the slowest takes several times as long per round as the fastest. The
arms differ only in the service's fusion policy:

- `sync`: fuse when every contributor has sent (`when_waiting` = all), and each waits for
  the new base: synchronous rounds, paced by the slowest.
- `async`: fuse as soon as `when_waiting` contributions wait; stale ones are rebased.
- `async_weighted`: the same, staleness-weighted ((1 + s)^-0.5, FedAsync).
- `async_bounded`: the same, contributions more than 2 versions behind refused.

Each arm runs for `--minutes` of wall time. Afterwards every version is scored offline on
the contributors' tasks (the service's operator suite: a linear probe per task), and its
time is when it was fused. Prints one JSON line per version and a summary per arm (the
best score reached, and the score reached by fixed times); writes
results/async_vs_sync.jsonl and plots/async_vs_sync.png. Resumes: an arm already in the
results file is not run again (delete its lines to rerun it).

    python benchmarks/async_vs_sync.py [--minutes 12] [--arms sync async ...] [--quick]
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx
import yaml

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "async_vs_sync.jsonl"
PLOT = HERE / "results" / "plots" / "async_vs_sync.png"

# contributor -> (task, examples per round): the slowest trains on 4x the fastest's data each round
CONTRIBUTORS = {"fast_a": ("tweet_sentiment", 160), "fast_b": ("election_tweets", 160),
                "medium": ("movie_sentiment", 320), "slow": ("reuters_r8", 640)}
ARMS = {
    "sync": {"when_waiting": len(CONTRIBUTORS)},
    "async": {"when_waiting": 1},
    "async_weighted": {"when_waiting": 1, "validation": {"staleness_exponent": 0.5}},
    "async_bounded": {"when_waiting": 1, "validation": {"max_staleness": 2}},
}


def emit(row: dict) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    with open(OUT, "a") as f:
        f.write(line + "\n")


def done_arms() -> set[str]:
    if not OUT.exists():
        return set()
    return {r["arm"] for r in map(json.loads, OUT.read_text().splitlines()) if r.get("part") == "summary"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_arm(name: str, policy: dict, minutes: float, model: str, quick: bool,
            work: Path) -> tuple[list[dict], dict[str, dict]]:
    """Serve, start the contributors, stop after `minutes`: every version with its fusion time,
    and per contributor what it sent, what was fused and what was refused."""
    from coldfusion.models.encoder import Encoder
    from coldfusion.repository import Repository
    from coldfusion.service.tokens import ServiceStore

    repo = Repository(work / name / "repo")
    if not repo.versions():
        encoder = Encoder.load(model)
        repo.add_version(encoder.pretrained, model_source=encoder.source, model_files=encoder.files_dir,
                         model_name=encoder.name)
    store = ServiceStore(repo.root)
    config = work / name / "service.yaml"
    config.write_text(yaml.safe_dump({"fusion": {**policy, "poll_seconds": 0.5, "after_seconds": 3600}}))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    serve = subprocess.Popen([sys.executable, "-m", "coldfusion", "serve", str(repo.root), "--port", str(port),
                              "--config", str(config)], stdout=open(work / name / "serve.log", "w"),
                             stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 120
        while True:
            try:
                httpx.get(url + "/v1/versions", timeout=2)
                break
            except httpx.HTTPError:
                if time.time() > deadline or serve.poll() is not None:
                    raise SystemExit(f"{name}: the service did not start (see {work / name / 'serve.log'})") from None
                time.sleep(0.5)
        started = datetime.now().astimezone()
        for contributor, (task, examples) in CONTRIBUTORS.items():
            task_config = work / name / f"{contributor}.yaml"
            task_config.write_text(yaml.safe_dump({
                "task": task, "examples_per_round": examples // 8 if quick else examples,
                "finetune": {"epochs": 1, "batch_size": 16 if quick else 32, "lr": 5e-5},
                "threads": 1, "max_length": 32 if quick else 64, "poll_seconds": 0.5,
                "wait_for_new_base": True}))
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "coldfusion", "contribute-loop", url, str(task_config),
                 "--workdir", str(work / name / f"work-{contributor}")],
                stdout=open(work / name / f"{contributor}.log", "w"), stderr=subprocess.STDOUT,
                env={**env, "COLDFUSION_TOKEN": store.issue(contributor)}))
        time.sleep(minutes * 60)
    finally:  # the service first: nothing is fused after the arm's time is up
        stop(serve)
        for proc in procs:
            stop(proc)
    versions, final = [], Repository(repo.root)  # opened afresh: the service wrote the index
    for v in final.versions():
        seconds = (datetime.fromisoformat(v.created) - started).total_seconds()
        versions.append({"version": v.id, "seconds": max(0.0, seconds), "parent": v.parent,
                         "contributions": len((v.fusion or {}).get("contributions", [])),
                         "rejected": len((v.fusion or {}).get("rejected", {})),
                         "rebased": len((v.fusion or {}).get("rebased", {}))})
    # from the index, not the versions' records: a fusion whose every contribution is refused
    # (one stale upload past max_staleness) makes no version, but the refusal is recorded
    sent = {}
    for c in final.contributions():
        counts = sent.setdefault(c.contributor, {"sent": 0, "fused": 0, "refused": 0})
        counts["sent"] += 1
        counts["fused"] += c.fused_into is not None
        counts["refused"] += c.rejected is not None
    return versions, sent


def score_versions(repo_root: Path, quick: bool) -> dict[int, dict[str, float]]:
    from coldfusion.repository import Repository
    from coldfusion.service.settings import SuiteSettings
    from coldfusion.service.suite import OperatorSuite

    repo = Repository(repo_root)
    sizes = {"train_examples": 100, "validation_examples": 50, "test_examples": 100} if quick else \
        {"train_examples": 400, "validation_examples": 200, "test_examples": 600}
    suite = OperatorSuite(SuiteSettings(tasks=[t for t, _ in CONTRIBUTORS.values()], evaluation=sizes,
                                        max_length=32 if quick else 64, threads=2, precision="fp32"))
    return {v.id: suite.scores(repo, v) for v in repo.versions()}


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for arm in ARMS:
        points = sorted((r["seconds"] / 60, r["score"]) for r in rows if r.get("arm") == arm and r["part"] == "version")
        if points:
            best, curve = -1.0, []
            for t, s in points:  # what the repository's best version scores by then
                best = max(best, s)
                curve.append((t, best))
            ax.step([t for t, _ in curve], [s for _, s in curve], where="post", label=arm, marker="o", ms=3)
    ax.set_xlabel("wall time (minutes)")
    ax.set_ylabel("best so far: mean probe accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=120, bbox_inches="tight")


def main() -> None:
    global OUT, PLOT
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=12.0, help="wall time of each arm")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--model", default="default")
    p.add_argument("--quick", action="store_true", help="small rounds and scores: checks the pipeline")
    p.add_argument("--out", type=Path, default=None, help="results file (default: results/async_vs_sync.jsonl)")
    args = p.parse_args()
    if args.out:
        OUT, PLOT = args.out, args.out.with_suffix(".png")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        for arm in args.arms:
            if arm in done_arms():
                continue
            (Path(scratch) / arm).mkdir()
            versions, sent = run_arm(arm, ARMS[arm], args.minutes, args.model, args.quick, Path(scratch))
            scores = score_versions(Path(scratch) / arm / "repo", args.quick)
            for v in versions:
                per_task = scores[v["version"]]
                emit({"part": "version", "arm": arm, **v, "score": round(sum(per_task.values()) / len(per_task), 2),
                      "tasks": {t: round(s, 2) for t, s in per_task.items()}})
            rows = [r for r in map(json.loads, OUT.read_text().splitlines()) if r.get("arm") == arm]
            by = {}
            for limit in (0.25, 0.5, 0.75, 1.0):
                within = [r["score"] for r in rows
                          if r["part"] == "version" and r["seconds"] <= limit * args.minutes * 60]
                by[f"best_by_{int(limit * 100)}pct"] = max(within) if within else None
            emit({"part": "summary", "arm": arm, "policy": ARMS[arm], "minutes": args.minutes,
                  "versions": len(versions), "fused": sum(v["contributions"] for v in versions),
                  "refused": sum(c["refused"] for c in sent.values()),
                  "rebased": sum(v["rebased"] for v in versions), "contributors": sent,
                  "pretrained": rows[0]["score"], "final": rows[-1]["score"], **by})
            shutil.rmtree(Path(scratch) / arm)  # an arm writes tens of GB of bodies: free them before the next
    plot([json.loads(line) for line in OUT.read_text().splitlines()])


if __name__ == "__main__":
    main()
