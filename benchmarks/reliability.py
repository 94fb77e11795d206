"""Reliability figures: bad inputs refused, crashes survived, accuracy under poisoning.

Three parts, each printing JSON lines (and appending them to results/reliability.jsonl):

- `inputs`: at least 100 bad inputs over every entry point that reads outside data
  (bad_inputs.py: safetensors and pickle uploads, model directories, run / evaluate /
  merge / multitask / selection configs, task files, hub datasets, names, command-line
  arguments; part generated with hypothesis). Each must be refused with a message that
  says what was wrong; none may crash or be accepted. The last line is
  {"metric": "bad_inputs", "tried", "refused_clearly", "refused_unclear", "crashed", "accepted_wrongly"}.
- `faults`: `coldfusion run` killed with SIGKILL at every failpoint (coldfusion/infra/faults.py),
  then `coldfusion verify` and `coldfusion run --resume`; counts contributions lost (must
  be 0) and checks the final base equals an uninterrupted run's. Tiny random encoder with
  the MiniLM tokenizer, two real built-in tasks: seconds per kill.
- `poisoning`: ColD Fusion with the bundled MiniLM on four real tasks, one contributor
  poisoned every iteration, for each aggregator; the fused base's mean linear-probe
  accuracy on the seen tasks against the clean run (about 3 minutes per run).

    python benchmarks/reliability.py [--parts inputs faults poisoning]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
COLDFUSION = str(Path(sys.executable).with_name("coldfusion"))


def emit(row: dict, out: Path) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    with open(out, "a") as f:
        f.write(line + "\n")


# -- inputs ----------------------------------------------------------------------------

def run_inputs(out: Path) -> None:
    sys.path.insert(0, str(HERE))
    from bad_inputs import cases, judge

    counts = {"tried": 0, "refused_clearly": 0, "refused_unclear": 0, "crashed": 0, "accepted_wrongly": 0}
    with tempfile.TemporaryDirectory(prefix="coldfusion-reliability-") as tmp:
        for kind, what, action, expected in cases(Path(tmp)):
            outcome, message = judge(action, expected)
            counts["tried"] += 1
            counts[outcome] += 1
            emit({"part": "inputs", "kind": kind, "input": what, "outcome": outcome,
                  "message": " ".join(message.split())[:300]}, out)
    emit({"metric": "bad_inputs", **counts}, out)


# -- faults ----------------------------------------------------------------------------

def tiny_model(root: Path) -> Path:
    """A 2-layer hidden-32 BERT with the MiniLM's tokenizer (real vocabulary, random weights)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from coldfusion.models.names import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    return root / "tiny"


def fault_config(model: Path, out: Path) -> dict:
    return {"name": "faults", "model": str(model), "threads": 1, "max_length": 48,
            "tasks": ["election_tweets", "bbc_topic"],
            "loop": {"iterations": 2, "examples_per_contributor": 96, "validation_examples": 32},
            "finetune": {"batch_size": 16},
            "evaluation": {"train_examples": 96, "validation_examples": 32, "test_examples": 64},
            "output_dir": str(out)}


def final_body(run_dir: Path) -> dict:
    from coldfusion.repository import Repository

    state = json.loads((run_dir / "state.json").read_text())
    return Repository(run_dir / "repository").load_version(state["version"])


def cli(*args, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "COLDFUSION_KILL_AT"}
    if kill_at:
        env["COLDFUSION_KILL_AT"] = kill_at
    return subprocess.run([COLDFUSION, *map(str, args)], env=env, capture_output=True, text=True, timeout=1800)


KILLS = ["training.step:5", "training.step:14", "fusion.tensor:20", "fusion.tensor:60", "checkpoint.partial:4",
         "checkpoint.partial:11", "checkpoint.unrenamed:7", "checkpoint.unrenamed:13", "repository.unindexed:3",
         "repository.unindexed:6", "loop.unrecorded:1", "loop.unrecorded:2"]


def run_faults(out: Path) -> None:
    from coldfusion.repository import Repository

    totals = {"faults_injected": 0, "killed": 0, "resumed": 0, "same_final_base": 0, "verify_ok": 0,
              "contributions_lost": 0}
    with tempfile.TemporaryDirectory(prefix="coldfusion-faults-") as tmp:
        root = Path(tmp)
        model = tiny_model(root)
        reference_cfg = root / "reference.yaml"
        reference_cfg.write_text(yaml.safe_dump(fault_config(model, root / "reference")))
        done = cli("run", reference_cfg)
        if done.returncode:
            raise SystemExit(f"the reference run failed: {done.stderr[-2000:]}")
        reference = final_body(root / "reference" / "faults")
        for point in KILLS:
            out_dir = root / point.replace(":", "-")
            path = root / f"{point.replace(':', '-')}.yaml"
            path.write_text(yaml.safe_dump(fault_config(model, out_dir)))
            run_dir = out_dir / "faults"
            started = time.perf_counter()
            killed = cli("run", path, kill_at=point)
            stored = {c.sha256 for c in Repository(run_dir / "repository").contributions()} \
                if (run_dir / "repository" / "index.sqlite").exists() else set()
            intact = cli("verify", run_dir / "repository").returncode == 0 if stored else True
            resumed = cli("run", path, "--resume")
            after = {c.sha256 for c in Repository(run_dir / "repository").contributions()}
            body = final_body(run_dir) if resumed.returncode == 0 else {}
            same = bool(body) and all(torch.equal(body[k], reference[k]) for k in reference)
            lost = len(stored - after)
            row = {"part": "faults", "kill_at": point, "killed": killed.returncode == -9,
                   "verify_after_kill": intact, "resumed": resumed.returncode == 0, "same_final_base": same,
                   "contributions_stored_before_kill": len(stored), "contributions_lost": lost,
                   "seconds": round(time.perf_counter() - started, 1)}
            emit(row, out)
            totals["faults_injected"] += 1
            totals["killed"] += row["killed"]
            totals["resumed"] += row["resumed"]
            totals["same_final_base"] += same
            totals["verify_ok"] += intact
            totals["contributions_lost"] += lost
    n = totals["faults_injected"]
    met = totals["contributions_lost"] == 0 and all(totals[k] == n for k in ("killed", "resumed", "same_final_base",
                                                                              "verify_ok"))
    emit({"part": "faults", "summary": totals, "target_met": met}, out)


# -- poisoning -------------------------------------------------------------------------

TASKS = ["tweet_sentiment", "movie_sentiment", "election_tweets", "reuters_r8"]
ATTACKER = "election_tweets"
OFF = {"outlier_factor": None, "base_norm_factor": None}  # admission's norm rules off: the aggregator alone defends
AGGREGATORS = {
    "average": {"method": "average", "validation": OFF},
    "average+validation": {"method": "average"},
    "median": {"method": "median", "validation": OFF},
    "trimmed_mean": {"method": "trimmed_mean", "params": {"trim": 0.25}, "validation": OFF},
    "norm_clipping": {"method": "norm_clipping", "validation": OFF},
}
# An honest update of the MiniLM here has a norm of about 0.5, its weights about 280: a
# poisoned update must be hundreds of times larger to move the average far (x20 and x100
# moved it by less than a point in a first run), or be shaped like an honest one.
ATTACKS = {"sign_flip x1000": {"kind": "sign_flip", "factor": 1000},
           "random x1000": {"kind": "random", "factor": 1000},
           "random x1": {"kind": "random", "factor": 1}}


def poisoning_run(name: str, fusion: dict, attack: dict | None, args, workdir: Path) -> dict:
    config = {"name": name, "seed": 0, "threads": args.threads, "model": "default", "max_length": 64, "tasks": TASKS,
              "loop": {"iterations": args.iterations, "examples_per_contributor": args.examples},
              "evaluation": {"train_examples": 300, "validation_examples": 100, "test_examples": 400},
              "fusion": fusion, "output_dir": str(workdir)}
    if attack:
        config["attack"] = {"contributors": [ATTACKER], **attack}
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    started = time.perf_counter()
    done = cli("run", path)
    if done.returncode:
        raise SystemExit(f"{name} failed: {done.stderr[-2000:]}")
    rows = [json.loads(line) for line in (workdir / name / "results.jsonl").read_text().splitlines()]
    acc = lambda it: 100 * sum(r["accuracy"] for r in rows if r["kind"] == "probe" and r["iteration"] == it) \
        / len(TASKS)  # noqa: E731
    return {"accuracy": round(acc(args.iterations), 2), "pretrained_accuracy": round(acc(0), 2),
            "rejected": [sorted(r["rejected"]) for r in rows if r["kind"] == "fusion"],
            "seconds": round(time.perf_counter() - started, 1)}


def run_poisoning(out: Path, args) -> None:
    with tempfile.TemporaryDirectory(prefix="coldfusion-poisoning-") as tmp:
        workdir = Path(tmp)
        clean = poisoning_run("clean", {"method": "average"}, None, args, workdir)
        emit({"part": "poisoning", "attack": None, "aggregator": "average", **clean}, out)
        summary = {}
        for attack_name, attack in ATTACKS.items():
            for agg_name, fusion in AGGREGATORS.items():
                name = f"{attack_name}-{agg_name}".replace(" ", "").replace("+", "-")
                result = poisoning_run(name, fusion, attack, args, workdir)
                gap = round(result["accuracy"] - clean["accuracy"], 2)
                emit({"part": "poisoning", "attack": attack_name, "attacker": ATTACKER, "aggregator": agg_name,
                      "points_vs_clean": gap, "within_1_point": abs(gap) <= 1.0, **result}, out)
                summary.setdefault(attack_name, {})[agg_name] = gap
        emit({"part": "poisoning", "summary_points_vs_clean": summary, "clean_accuracy": clean["accuracy"],
              "pretrained_accuracy": clean["pretrained_accuracy"]}, out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", nargs="+", default=["inputs", "faults", "poisoning"],
                   choices=["inputs", "faults", "poisoning"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iterations", type=int, default=2, help="poisoning: ColD Fusion iterations")
    p.add_argument("--examples", type=int, default=160, help="poisoning: examples per contributor per iteration")
    p.add_argument("--out", type=Path, default=HERE / "results" / "reliability.jsonl")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if "inputs" in args.parts:
        run_inputs(args.out)
    if "faults" in args.parts:
        run_faults(args.out)
    if "poisoning" in args.parts:
        run_poisoning(args.out, args)


if __name__ == "__main__":
    main()
