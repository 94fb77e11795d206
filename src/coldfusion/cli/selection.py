"""Choosing a starting point: rank candidate bases, select intermediate tasks."""

from pathlib import Path

import typer
from rich.table import Table

from coldfusion.cli.app import app, console, done, fail
from coldfusion.infra.errors import ColdFusionError


def _selection_settings(path: Path | None):
    from coldfusion.selection.settings import load_selection_settings

    try:
        return load_selection_settings(path)
    except ColdFusionError as exc:
        fail(exc)


def _write_rows(rows: list[dict], output: Path | None) -> None:
    if output is not None:
        import json

        from coldfusion.io.checkpoint import atomic_write_bytes

        atomic_write_bytes(output, "".join(json.dumps(r) + "\n" for r in rows).encode())
        done("rows written to", str(output))


def _cache_option():
    from coldfusion.selection.cache import default_cache

    return typer.Option(default_cache(), help="repository that caches features and finetune scores "
                        "($COLDFUSION_CACHE/selection by default)")


SETTINGS_HELP = "selection settings (YAML; keys of coldfusion/selection/settings.py); default built in"


@app.command()
def rank(
    candidates: list[str] = typer.Argument(..., help="candidate bodies: REPO (its newest version), REPO@VERSION, "
                                           "a model directory, 'default' (the bundled MiniLM) or a hub id"),
    target: str = typer.Option(..., help="the target task: a built-in name or a task file"),
    by: str = typer.Option("logme", help="order by 'logme' or 'probe' (linear-probe accuracy); LogME had the "
                           "lowest Regret@3 in benchmarks/selection.py, the probe the highest"),
    top_k: int = typer.Option(0, "--top-k", min=0, help="finetune the top K on the target (over the seeds) "
                              "to confirm, with their gain over --base"),
    base: str = typer.Option("default", help="the pretrained base the gains are measured against"),
    settings: Path | None = typer.Option(None, help=SETTINGS_HELP),
    cache: Path = _cache_option(),
    output: Path | None = typer.Option(None, help="also write the rows as JSON lines here"),
) -> None:
    """Rank candidate starting points for a target task by LogME and linear probe on frozen features."""
    from coldfusion.infra.progress import RichProgress
    from coldfusion.selection import commands

    s = _selection_settings(settings)
    try:
        with RichProgress() as progress:
            rows = commands.rank(target, candidates, s, cache, by, top_k, base, progress)
    except ColdFusionError as exc:
        fail(exc)
    table = Table(title=f"candidates for {target}, best first by {by}")
    for col in ("rank", "candidate", "probe acc (val)", "LogME", "finetuned acc (test)", f"gain vs {base}", "seconds"):
        table.add_column(col, justify="left" if col == "candidate" else "right",
                         overflow="fold" if col == "candidate" else "ellipsis")  # paths are the names: show them whole
    for i, r in enumerate(rows, 1):
        finetuned = "-" if r.finetune is None else f"{r.finetune:.1f} ± {r.finetune_sd:.1f}"
        gain = "-" if r.gain is None else f"{r.gain:+.1f}"
        table.add_row(str(i), r.name, f"{100 * r.probe:.1f}", f"{r.logme:.3f}", finetuned, gain,
                      f"{r.seconds + (r.finetune_seconds or 0):.1f}")
    console.print(table)
    _write_rows([{"rank": i, "candidate": r.name, "probe": r.probe, "logme": r.logme, "finetune": r.finetune,
                  "finetune_sd": r.finetune_sd, "gain": r.gain, "seconds": r.seconds,
                  "finetune_seconds": r.finetune_seconds} for i, r in enumerate(rows, 1)], output)


@app.command()
def select(
    target: str = typer.Option(..., help="the target task: a built-in name or a task file"),
    sources: list[str] = typer.Option(..., help="candidate intermediate tasks (repeat the option, or separate "
                                      "by commas): built-in names or task files"),
    by: str = typer.Option("logme", help="order by 'logme' or 'probe' (of the source-finetuned bodies), or 'semb' "
                           "(cheapest: no intertraining needed to score)"),
    base: str = typer.Option("default", help="the model intertrained on each source"),
    settings: Path | None = typer.Option(None, help=SETTINGS_HELP),
    intertraining: str | None = typer.Option(None, help="'full' (the whole body) or 'lora' (a LoRA adapter on "
                                             "the frozen body, adapter settings); default: the settings file's"),
    cache: Path = _cache_option(),
    output: Path | None = typer.Option(None, help="also write the rows as JSON lines here"),
) -> None:
    """Rank source tasks as intermediate tasks for a target: SEmb, and LogME and linear probe of
    the base finetuned on each source (those finetunes are cached)."""
    from coldfusion.infra.progress import RichProgress
    from coldfusion.selection import commands

    s = _selection_settings(settings)
    if intertraining is not None:
        if intertraining not in ("full", "lora"):
            fail(f"--intertraining must be 'full' or 'lora', not '{intertraining}'")
        s = s.model_copy(update={"intertraining": intertraining})
    names = [name.strip() for text in sources for name in text.split(",") if name.strip()]
    try:
        with RichProgress() as progress:
            rows = commands.select(target, names, s, cache, by, base, progress)
    except ColdFusionError as exc:
        fail(exc)
    table = Table(title=f"intermediate tasks for {target}, best first by {by}")
    for col in ("rank", "source", "probe acc (val)", "LogME", "SEmb", "intertraining s", "scoring s"):
        table.add_column(col, justify="left" if col == "source" else "right")
    for i, r in enumerate(rows, 1):
        scoring = sum(v for k, v in r.seconds.items() if k != "intertrain")
        table.add_row(str(i), r.source, f"{100 * r.probe:.1f}", f"{r.logme:.3f}", f"{r.semb:.3f}",
                      f"{r.seconds['intertrain']:.1f}", f"{scoring:.1f}")
    console.print(table)
    _write_rows([{"rank": i, "source": r.source, "probe": r.probe, "logme": r.logme, "semb": r.semb,
                  "seconds": r.seconds} for i, r in enumerate(rows, 1)], output)
