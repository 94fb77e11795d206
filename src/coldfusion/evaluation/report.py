"""The evaluation report: per protocol, a row per task and a column per body (mean and
standard deviation over seeds), the average, the gain over the reference body with a
95% paired-bootstrap interval (over test examples and seeds), and the share of tasks on
which each body beats the reference."""

from collections import defaultdict
from pathlib import Path

import numpy as np

from coldfusion.evaluation.stats import correctness, paired_bootstrap_gain
from coldfusion.io.checkpoint import atomic_write_bytes
from coldfusion.io.results import ResultsLog


def _fmt(x: float) -> str:
    return f"{100 * x:.1f}"


def _signed(x: float) -> str:
    return f"{100 * x:+.1f}"


def protocol_table(rows: list[dict], protocol: str, bodies: list[str], reference: str) -> tuple[str, dict]:
    """Markdown table of one protocol, and its numbers (gain, interval, win share per body)."""
    acc, bits = defaultdict(dict), defaultdict(dict)  # [(task, body)][seed]
    for r in rows:
        if r["protocol"] == protocol:
            acc[(r["task"], r["body"])][r["seed"]] = r["accuracy"]
            bits[(r["task"], r["body"])][r["seed"]] = correctness(r["test_correct"])
    tasks = sorted({t for t, _ in acc}, key=lambda t: min(i for i, r in enumerate(rows) if r["task"] == t))
    header = f"| task | {' | '.join(bodies)} |\n|---|{'---:|' * len(bodies)}\n"
    lines, numbers = [], {}
    for t in tasks:
        cells = []
        for b in bodies:
            values = list(acc[(t, b)].values())
            cells.append(f"{_fmt(np.mean(values))} ± {_fmt(np.std(values))}" if values else "-")
        lines.append(f"| {t} | {' | '.join(cells)} |")
    # averages over the tasks every body has results for, so the columns are comparable
    common = [t for t in tasks if all(acc[(t, b)] for b in bodies)]
    means = {b: [np.mean(list(acc[(t, b)].values())) for t in common] for b in bodies}
    label = "**average**" if len(common) == len(tasks) else f"**average** ({len(common)} tasks all bodies have)"
    lines.append(f"| {label} | {' | '.join(_fmt(np.mean(means[b])) if means[b] else '-' for b in bodies)} |")
    gain_cells, win_cells = [], []
    for b in bodies:
        # paired: tasks and seeds both bodies have
        paired = [(t, sorted(set(acc[(t, b)]) & set(acc[(t, reference)]))) for t in tasks]
        paired = [(t, seeds) for t, seeds in paired if seeds]
        if b == reference or not paired:
            gain_cells.append("-")
            win_cells.append("-")
            continue
        before = [np.stack([bits[(t, reference)][s] for s in seeds]) for t, seeds in paired]
        after = [np.stack([bits[(t, b)][s] for s in seeds]) for t, seeds in paired]
        gain, lo, hi = paired_bootstrap_gain(before, after)
        wins = sum(bool(np.mean([acc[(t, b)][s] for s in seeds]) > np.mean([acc[(t, reference)][s] for s in seeds]))
                   for t, seeds in paired)
        numbers[b] = {"gain": gain, "low": lo, "high": hi, "wins": wins, "tasks": len(paired)}
        gain_cells.append(f"{_signed(gain)} [{_signed(lo)}, {_signed(hi)}]")
        win_cells.append(f"{wins}/{len(paired)} ({100 * wins / len(paired):.0f}%)")
    lines.append(f"| gain over {reference} [95% CI] | {' | '.join(gain_cells)} |")
    lines.append(f"| tasks better than {reference} | {' | '.join(win_cells)} |")
    return header + "\n".join(lines) + "\n", numbers


def _held_out(config) -> str:
    if config.held_out == "validation":
        return "validation split (a tuning run: test splits untouched; early stopping on the end of train)"
    return "test split"


def write_eval_report(run_dir: Path, config) -> Path:
    rows = ResultsLog(run_dir / "results.jsonl").rows()
    bodies = [b.name for b in config.bodies]
    parts = [f"# Evaluation: {config.name}\n",
             f"Accuracy (%) on each task's {_held_out(config)}, mean ± standard deviation over seeds {config.seeds}. "
             f"Gains are paired (same seeds, same test examples) and their intervals come from a bootstrap over "
             f"test examples and seeds.\n"]
    for protocol in config.protocols:
        if any(r["protocol"] == protocol for r in rows):
            table, _ = protocol_table(rows, protocol, bodies, config.reference_body)
            parts.append(f"## {protocol}\n\n{table}")
    out = run_dir / "summary.md"
    atomic_write_bytes(out, "\n".join(parts).encode())
    return out
