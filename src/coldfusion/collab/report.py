"""Run reports: summary.md (per-task table, base vs latest), report.html and PNG plots."""

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from coldfusion.evaluation.stats import correctness, paired_bootstrap_gain  # noqa: E402
from coldfusion.io.checkpoint import atomic_write_bytes  # noqa: E402
from coldfusion.io.results import ResultsLog  # noqa: E402


def accuracy_table(rows: list[dict]) -> tuple[list[str], list[int], dict[tuple[str, int], float]]:
    """Linear-probe test accuracy by (task, iteration)."""
    probe = [r for r in rows if r["kind"] == "probe"]
    tasks = list(dict.fromkeys(r["task"] for r in probe))
    iterations = sorted({r["iteration"] for r in probe})
    return tasks, iterations, {(r["task"], r["iteration"]): r["accuracy"] for r in probe}


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def _gain_cell(gain: float, lo: float | None, hi: float | None) -> str:
    return f"{100 * gain:+.1f}" + ("" if lo is None else f" [{100 * lo:+.1f}, {100 * hi:+.1f}]")


def _verdict(gain: float, lo: float | None, hi: float | None) -> str:
    if lo is None:
        return "beats" if gain > 0 else "does not beat"
    if lo > 0:
        return "beats"
    return "is worse than" if hi < 0 else "is not distinguishable from"


def summary_markdown(rows: list[dict], title: str) -> str:
    tasks, iterations, acc = accuracy_table(rows)
    if not iterations:
        return f"# {title}\n\nNo results yet.\n"
    first, last = iterations[0], iterations[-1]
    correct = {(r["task"], r["iteration"]): correctness(r["test_correct"])
               for r in rows if r["kind"] == "probe" and "test_correct" in r}
    # A contributor that sent no scores for an iteration leaves a hole: the gain and the
    # means are over the tasks scored in both the first and the last iteration.
    compared = [t for t in tasks if (t, first) in acc and (t, last) in acc]
    paired = all((t, i) in correct for t in compared for i in (first, last))

    def gain_of(task_list: list[str]) -> tuple[float, float | None, float | None]:
        if paired:
            return paired_bootstrap_gain([correct[t, first] for t in task_list], [correct[t, last] for t in task_list])
        return sum(acc[t, last] - acc[t, first] for t in task_list) / len(task_list), None, None

    header = ["task"] + [f"it {i}" for i in iterations] + ["gain [95% CI]"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    wins = 0
    server = {r["task"] for r in rows if r["kind"] == "probe" and r.get("scored_by") == "server"}
    for t in tasks:
        cell = ""
        if t in compared:
            task_gain = gain_of([t])
            wins += task_gain[0] > 0
            cell = _gain_cell(*task_gain)
        label = f"{t} (server)" if t in server else t
        lines.append("| " + " | ".join([label] + [_pct(acc.get((t, i))) for i in iterations] + [cell]) + " |")
    means = {i: sum(acc.get((t, i), 0) for t in compared) / max(len(compared), 1) for i in iterations}
    gain, lo, hi = gain_of(compared) if compared else (0.0, None, None)
    cells = ["**mean**"] + [f"**{_pct(means[i])}**" for i in iterations] + [f"**{_gain_cell(gain, lo, hi)}**"]
    lines.append("| " + " | ".join(cells) + " |")
    fusion = [r for r in rows if r["kind"] == "fusion"]
    method = fusion[-1]["method"] if fusion else "average"
    ci = "" if lo is None else f", 95% CI [{100 * lo:+.1f}, {100 * hi:+.1f}]"
    scorers = "each scored by its contributor on its own data"
    if server:
        scorers += " (rows marked (server): the repository owner's own suite, scored on the server)"
    subset = f" (the mean is over the {len(compared)} of {len(tasks)} tasks scored in both)" \
        if len(compared) < len(tasks) else ""
    return "\n".join([
        f"# {title}",
        "",
        f"Linear-probe test accuracy (%) of the base after each iteration on the seen tasks, {scorers}; "
        f"iteration 0 is the pretrained base, fusion method `{method}`.",
        "",
        *lines,
        "",
        f"**Result:** after {last} iteration(s) the fused base {_verdict(gain, lo, hi)} the pretrained one: "
        f"mean accuracy {_pct(means[first])} -> {_pct(means[last])} ({100 * gain:+.1f} points{ci}), "
        f"better on {wins} of {len(compared)} tasks{subset}.",
        "",
        "Intervals are paired bootstraps over the test examples (same examples for both bases); "
        "they do not include the variance over training seeds, which a single run cannot measure.",
        "",
        *_communication(fusion),
        *_left_out(fusion + [r for r in rows if r["kind"] == "unscored"]),
        "![accuracy per iteration](plots/accuracy.png)",
        "",
    ])


def _communication(fusion_rows: list[dict]) -> list[str]:
    """Bytes sent by the contributors and stored by the repository, per iteration."""
    rows = [r for r in fusion_rows if "bytes_sent" in r]  # runs made before bytes were counted have none
    if not rows:
        return []
    mb = lambda n: f"{n / 1e6:.2f}"  # noqa: E731
    lines = ["| iteration | encoding | contributions | MB sent | MB per contribution | MB stored |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        n = len(r["contributors"]) + len(r.get("rejected") or {})
        lines.append(f"| {r['iteration']} | {r['encoding']} | {n} | {mb(r['bytes_sent'])} | "
                     f"{mb(r['bytes_sent'] / max(n, 1))} | {mb(r['bytes_stored'])} |")
    return ["**Communication** (what contributors sent, kept as sent; stored adds the new base):", "", *lines, ""]


def _left_out(rows: list[dict]) -> list[str]:
    """Contributions refused by validation, contributors that declined or sent nothing (and
    those that sent no scores: `unscored` rows), per iteration."""
    lines = [f"- iteration {r['iteration']}: {name} {verb}: {why}"
             for r in rows if r["kind"] == "fusion"
             for key, verb in (("rejected", "refused"), ("declined", "declined"), ("missing", "sent nothing"))
             for name, why in (r.get(key) or {}).items()]
    lines += [f"- iteration {r['iteration']}: {r['task']} sent no scores: {r['reason']}"
              for r in rows if r["kind"] == "unscored"]
    return ["**Left out:**", "", *lines, ""] if lines else []


def plot_accuracy(rows: list[dict], path: Path) -> None:
    tasks, iterations, acc = accuracy_table(rows)
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    for t in tasks:
        ax.plot(iterations, [100 * acc.get((t, i), float("nan")) for i in iterations], marker="o", alpha=0.7, label=t)
    means = [100 * sum(acc.get((t, i), 0) for t in tasks) / len(tasks) for i in iterations]
    ax.plot(iterations, means, color="black", linewidth=2.5, marker="s", label="mean")
    ax.set_xlabel("iteration (0 = pretrained base)")
    ax.set_ylabel("linear-probe test accuracy (%)")
    ax.set_xticks(iterations)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never hides a line
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown_table_to_html(markdown: str) -> str:
    out, rows = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            if not line.startswith("|---"):
                rows.append([html.escape(c.strip().strip("*")) for c in line.strip("|").split("|")])
            continue
        if rows:
            head, *body = rows
            out.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in body) + "</table>")
            rows = []
        if line.startswith("# "):
            out.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("!["):
            out.append('<img src="plots/accuracy.png" alt="accuracy per iteration">')
        elif line.strip():
            out.append(f"<p>{html.escape(line).replace('**', '')}</p>")
    style = "body{font-family:sans-serif;max-width:60em;margin:2em auto}td,th{padding:.2em .6em;text-align:right}"
    head = f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style></head>"
    return f"{head}<body>{''.join(out)}</body></html>"


def write_report(run_dir: Path) -> None:
    run_dir = Path(run_dir)
    rows = ResultsLog(run_dir / "results.jsonl").rows()
    markdown = summary_markdown(rows, f"ColD Fusion run `{run_dir.name}`")
    atomic_write_bytes(run_dir / "summary.md", markdown.encode())
    atomic_write_bytes(run_dir / "report.html", _markdown_table_to_html(markdown).encode())
    plot_accuracy(rows, run_dir / "plots" / "accuracy.png")
