"""The `coldfusion` command: parse, call the library, print. No logic of its own."""

import os
import sys
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we fork nothing; keeps the log quiet

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.markdown import Markdown  # noqa: E402
from rich.table import Table  # noqa: E402
from rich.text import Text  # noqa: E402

from coldfusion.errors import ColdFusionError  # noqa: E402

HELP = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  context_settings=HELP, help="ColD Fusion: collaborative descent for text encoders.")
console = Console()


def _print_version(value: bool) -> None:
    if value:
        from coldfusion import __version__

        console.print(f"coldfusion {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", "-V", callback=_print_version, is_eager=True,
                                          help="print the version and exit")) -> None:
    """ColD Fusion: collaborative descent for text encoders."""


def _fail(exc: ColdFusionError) -> None:
    # the message is plain text (paths, YAML excerpts with brackets): never markup
    Console(stderr=True).print(Text.assemble(("error:", "bold red"), " ", str(exc)), highlight=False)
    raise typer.Exit(code=2)


@contextmanager
def _interrupted(again: str):
    """Ctrl-C ends a long command with a word on how to go on, not silently (exit 130)."""
    try:
        yield
    except KeyboardInterrupt:
        Console(stderr=True).print(Text.assemble(
            ("interrupted:", "bold yellow"), " what finished is kept (checkpoints are written atomically); "
            f"continue with: {again}"), highlight=False)
        raise typer.Exit(code=130) from None


def _done(label: str, rest: str) -> None:
    """A green label, then plain text (paths and names are never read as markup)."""
    console.print(Text.assemble((label, "green"), " ", rest), highlight=False)


def _say(text: str) -> None:
    console.print(text, markup=False, highlight=False)


def _repository(path: Path):
    """The repository at `path`; a path that holds none is an error, not a new repository."""
    from coldfusion.repository import Repository

    try:
        return Repository(path, create=False)
    except ColdFusionError as exc:
        _fail(exc)


@app.command()
def run(
    config: Path = typer.Argument(..., help="run config (YAML); see configs/quickstart.yaml"),
    resume: bool = typer.Option(False, "--resume", help="continue the run from its last finished iteration"),
    run_dir: Path | None = typer.Option(None, help="run directory (default: <output_dir>/<name>)"),
) -> None:
    """Run a ColD Fusion experiment and write its run directory (engine: local, or flower simulation)."""
    from coldfusion.config import load_config  # light: a bad config is reported before torch loads

    try:
        cfg = load_config(config)
        if cfg.deployment:
            raise ColdFusionError(
                f"{config} runs on a Flower deployment: write its Flower app with `coldfusion flower app {config} "
                f"APP_DIR` and submit it with `flwr run APP_DIR` once every contributor's SuperNode is up (see the "
                f"README, 'Across machines on Flower'); to try a deployment on this machine, give `coldfusion "
                f"flower local` a one-file config that lists the tasks with their data")
        from coldfusion.collab import run_cold_fusion
        from coldfusion.progress import RichProgress

        with _interrupted(f"coldfusion run {config} --resume"), RichProgress() as progress:
            if cfg.engine == "flower":
                from coldfusion.collab.flower.simulation import run_on_simulation

                out = run_on_simulation(cfg, run_dir=run_dir, resume=resume, progress=progress)
            else:
                out = run_cold_fusion(cfg, run_dir=run_dir, resume=resume, progress=progress)
    except ColdFusionError as exc:
        _fail(exc)
    summary = (out / "summary.md").read_text()
    console.print(Markdown("\n".join(line for line in summary.splitlines() if not line.startswith("!["))))
    _done("run directory:", str(out))


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
        from coldfusion.progress import RichProgress

        with _interrupted(f"coldfusion evaluate {config}"), RichProgress() as progress:
            out = run_evaluation(cfg, run_dir=run_dir, progress=progress)
    except ColdFusionError as exc:
        _fail(exc)
    console.print(Markdown((out / "summary.md").read_text()))
    _done("results:", f"{out / 'results.jsonl'}")


@app.command()
def multitask(config: Path = typer.Argument(..., help="multitask config (YAML); see configs/multitask.yaml")) -> None:
    """Train the multitask baseline (one body, a head per task) and store its body in a repository."""
    from coldfusion.multitask.config import load_multitask_config

    try:
        cfg = load_multitask_config(config)
        from coldfusion.multitask.run import run_multitask
        from coldfusion.progress import RichProgress

        with RichProgress() as progress:
            out = run_multitask(cfg, progress=progress)
    except ColdFusionError as exc:
        _fail(exc)
    console.print(Markdown((out / "summary.md").read_text()))


@app.command()
def merge(config: Path = typer.Argument(..., help="merge config (YAML); see configs/merge_example.yaml")) -> None:
    """Fuse finetuned checkpoints you already have into one encoder directory."""
    _start_hashing_inputs(config)  # the model card's checksums, while torch imports
    from coldfusion.merge import load_merge_config, merge_checkpoints

    try:
        out = merge_checkpoints(load_merge_config(config))
    except ColdFusionError as exc:
        _fail(exc)
    _done("merged encoder written to", f"{out} (model card: {out / 'README.md'})")


def _start_hashing_inputs(config: Path) -> None:
    """Best effort: the config is validated properly later."""
    from coldfusion.configfile import read_yaml_mapping
    from coldfusion.inputs import safetensors_files, start_hashing

    try:
        models = read_yaml_mapping(config).get("models") or []
        dirs = [Path(m["model"]) for m in models if isinstance(m, dict) and isinstance(m.get("model"), str)]
        start_hashing([f for d in dirs if d.is_dir() for f in safetensors_files(d)])
    except (ColdFusionError, OSError, ValueError, KeyError, TypeError):
        pass


@app.command()
def tasks() -> None:
    """List the built-in tasks: labels, split sizes and the package each comes from."""
    from coldfusion.tasks import CATALOG, load_builtin

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


def _selection_settings(path: Path | None):
    from coldfusion.selection.settings import load_selection_settings

    try:
        return load_selection_settings(path)
    except ColdFusionError as exc:
        _fail(exc)


def _write_rows(rows: list[dict], output: Path | None) -> None:
    if output is not None:
        import json

        from coldfusion.checkpoint import atomic_write_bytes

        atomic_write_bytes(output, "".join(json.dumps(r) + "\n" for r in rows).encode())
        _done("rows written to", str(output))


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
    by: str = typer.Option("logme", help="order by 'logme' or 'probe' (linear-probe accuracy); LogME ranked best "
                           "in benchmarks/selection.py"),
    top_k: int = typer.Option(0, "--top-k", min=0, help="finetune the top K on the target (over the seeds) "
                              "to confirm, with their gain over --base"),
    base: str = typer.Option("default", help="the pretrained base the gains are measured against"),
    settings: Path | None = typer.Option(None, help=SETTINGS_HELP),
    cache: Path = _cache_option(),
    output: Path | None = typer.Option(None, help="also write the rows as JSON lines here"),
) -> None:
    """Rank candidate starting points for a target task by LogME and linear probe on frozen features."""
    from coldfusion.progress import RichProgress
    from coldfusion.selection import commands

    s = _selection_settings(settings)
    try:
        with RichProgress() as progress:
            rows = commands.rank(target, candidates, s, cache, by, top_k, base, progress)
    except ColdFusionError as exc:
        _fail(exc)
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
    cache: Path = _cache_option(),
    output: Path | None = typer.Option(None, help="also write the rows as JSON lines here"),
) -> None:
    """Rank source tasks as intermediate tasks for a target: SEmb, and LogME and linear probe of
    the base finetuned on each source (those finetunes are cached)."""
    from coldfusion.progress import RichProgress
    from coldfusion.selection import commands

    s = _selection_settings(settings)
    names = [name.strip() for text in sources for name in text.split(",") if name.strip()]
    try:
        with RichProgress() as progress:
            rows = commands.select(target, names, s, cache, by, base, progress)
    except ColdFusionError as exc:
        _fail(exc)
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


@app.command()
def versions(repository: Path = typer.Argument(..., help="repository directory")) -> None:
    """List the base versions of a repository: lineage, contributions fused and refused, and the
    mean linear-probe accuracy (acc) over the tasks that scored it."""
    repo = _repository(repository)
    table = Table(title=f"versions in {repository}")
    for col in ("id", "parent", "iter", "method", "fused", "refused", "sha256", "acc"):
        whole = col not in ("fused", "refused")  # lists of ids wrap; nothing else is cut
        table.add_column(col, no_wrap=whole, overflow="fold", justify="right" if col == "acc" else "left",
                         ratio=1 if not whole else None)
    for v in repo.versions():
        accs = [m["values"]["accuracy"] for m in repo.metrics(v.id) if m["protocol"] == "linear_probe"]
        fusion = v.fusion or {}
        iteration = "-" if v.iteration is None else str(v.iteration)
        iteration += " (abandoned)" if v.abandoned else ""
        table.add_row(str(v.id), str(v.parent or "-"), iteration, fusion.get("method", "pretrained"),
                      ", ".join(map(str, fusion.get("contributions", []))) or "-",
                      ", ".join(fusion.get("rejected", {})) or "-", v.sha256[:12],
                      f"{100 * sum(accs) / len(accs):.1f}" if accs else "-")
    console.print(table)


@app.command()
def export(
    repository: Path = typer.Argument(..., help="repository directory"),
    version: str = typer.Argument(..., help="version id (e.g. 3), checksum prefix, or 'latest'"),
    out_dir: Path = typer.Argument(..., help="directory to write (loadable by AutoModel.from_pretrained)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace OUT_DIR if it exists"),
) -> None:
    """Export a base version as a Hugging Face model directory, with a model card and provenance."""
    from coldfusion.export import export_version

    repo = _repository(repository)
    try:
        v, out = export_version(repo, version, out_dir, overwrite)
    except ColdFusionError as exc:
        _fail(exc)
    _say(f"exported version {v.id} ({v.sha256[:12]}) to {out} (model card: {out / 'README.md'})")


@app.command("adopt-model")
def adopt_model(
    repository: Path = typer.Argument(..., help="repository directory"),
    model: str = typer.Argument(..., help="the pretrained model its versions were made from: 'default' or a "
                                         "model directory"),
) -> None:
    """Store a model's config and tokenizer files in a repository made before they were stored,
    so that it exports and evaluates without the model directory."""
    from coldfusion.model_names import portable_name, resolve_model_source

    repo = _repository(repository)
    try:
        directory = Path(resolve_model_source(model))
        if not directory.is_dir():
            raise ColdFusionError(f"'{model}' is not a model directory (nor 'default')")
        ids = repo.adopt_model(directory, portable_name(model))
    except ColdFusionError as exc:
        _fail(exc)
    _say(f"stored the files of {portable_name(model)} for {len(ids)} versions that had none")


@app.command()
def contribute(
    repository: Path = typer.Argument(..., help="repository directory"),
    upload: Path = typer.Argument(..., help="the finetuned body: a .safetensors file or a model directory"),
    base: str = typer.Option(..., help="the version it was finetuned from (id or checksum prefix)"),
    contributor: str = typer.Option(..., help="who sends it"),
    task: str = typer.Option(..., help="the task it was finetuned on"),
    examples: int = typer.Option(..., min=1, help="training examples it saw (weights 'weighted' fusion)"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="UNSAFE: accept a pickle (.bin/.pt)"),
) -> None:
    """Add a contribution finetuned outside a run; `coldfusion fuse` validates and fuses it."""
    from coldfusion.tensorfile import SafetensorsReader
    from coldfusion.uploads import read_upload

    repo = _repository(repository)
    try:
        version = repo.version(base)
        with SafetensorsReader([repo.path_of(version.sha256)]) as reader:  # the names only
            body = read_upload(upload, reader.keys(), allow_pickle)
        c = repo.add_contribution(body, base_version=version.id, contributor=contributor, task=task,
                                  num_examples=examples)
    except ColdFusionError as exc:
        _fail(exc)
    _say(f"stored contribution {c.id} ({c.sha256[:12]}) from {contributor}, trained from version {version.id}")


@app.command()
def fuse(
    repository: Path = typer.Argument(..., help="repository directory"),
    base: str | None = typer.Option(None, help="the version to fuse onto (default: the newest)"),
    contributions: str | None = typer.Option(
        None, help="comma-separated contribution ids (default: every one sent with `contribute` and not yet fused, "
                   "refused or abandoned)"),
    method: str = typer.Option("average", help="fusion operator (see the README's list)"),
    param: list[str] = typer.Option([], help="operator parameter as KEY=VALUE (repeatable)"),
    min_accepted: int = typer.Option(1, min=1, help="fuse only when at least this many pass validation"),
    outlier_factor: float | None = typer.Option(5.0, help="refuse a delta norm above this multiple of the "
                                                           "others' median (0: off)"),
    max_delta_norm: float | None = typer.Option(None, help="refuse a delta norm above this"),
    stale: str = typer.Option("rebase", help="a contribution from an older base: rebase or reject"),
) -> None:
    """Validate contributions and fuse those that pass into a new version (refusals are recorded)."""
    import re

    import yaml
    from pydantic import ValidationError

    from coldfusion.configfile import format_validation_error
    from coldfusion.validation import ValidationSettings

    repo = _repository(repository)
    try:
        from coldfusion.fusion import get_operator

        params = {}
        for item in param:  # the method and its parameters are checked before anything else
            key, sep, value = item.partition("=")
            if not sep:
                raise ColdFusionError(f"--param {item}: expected KEY=VALUE, e.g. --param density=0.5")
            try:
                params[key] = yaml.safe_load(value)
            except yaml.YAMLError:
                params[key] = value  # not YAML: the operator's check says what it expected
        get_operator(method).check_params(params)
        try:
            settings = ValidationSettings(min_accepted=min_accepted, outlier_factor=outlier_factor or None,
                                          max_delta_norm=max_delta_norm, stale=stale)
        except ValidationError as exc:
            raise ColdFusionError(format_validation_error(exc, "options")) from None
        onto = repo.resolve(base or "latest")
        if contributions:
            if not re.fullmatch(r"\d+(,\d+)*", contributions.replace(" ", "")):
                raise ColdFusionError(f"--contributions {contributions}: expected comma-separated ids, e.g. 3,4")
            ids = [int(x) for x in contributions.replace(" ", "").split(",")]
        else:
            ids = [c.id for c in repo.contributions() if c.waiting and c.run_id is None]  # runs fuse their own
        if not ids:
            raise ColdFusionError(f"no contributions waiting to be fused in {repository}")
        version = repo.fuse(onto.id, ids, method=method, params=params, validation=settings)
    except ColdFusionError as exc:
        _fail(exc)
    fusion = version.fusion
    _say(f"version {version.id} = {method} of contributions {fusion['contributions']} onto version {onto.id}")
    for cid, why in fusion.get("rejected", {}).items():
        console.print(Text.assemble(("refused", "yellow"), f" contribution {cid}: {why}"), highlight=False)
    for cid, moved in fusion.get("rebased", {}).items():
        _say(f"rebased contribution {cid} from version {moved['from_version']}")


@app.command()
def verify(
    repository: Path = typer.Argument(..., help="repository directory"),
    clean: bool = typer.Option(False, "--clean", help="delete what interrupted writes left behind "
                                                      "(only while nothing else writes to the repository)"),
) -> None:
    """Check a repository: its index, and every stored file against its checksum."""
    report = _repository(repository).verify(clean=clean)
    for problem in report.problems:
        Console(stderr=True).print(Text.assemble(("damaged:", "bold red"), f" {problem}"), highlight=False)
    left = len(report.temporary) + len(report.unreferenced)
    verb = "deleted" if report.cleaned else "found (harmless; --clean deletes them)"
    if left:
        _say(f"{verb}: {len(report.temporary)} temporary files, {len(report.unreferenced)} unindexed objects "
                      "left by interrupted writes")
    if report.without_model_files:
        _say(f"note: {len(report.without_model_files)} versions name their model only by a path, so they cannot be "
             f"exported or evaluated once it is gone; store its files with `coldfusion adopt-model {repository} "
             "MODEL`")
    if not report.ok:
        raise typer.Exit(code=1)
    _done("ok:", f"{report.checkpoints} checkpoints match their checksums; the index is consistent")


flower = typer.Typer(no_args_is_help=True, context_settings=HELP,
                     help="Run ColD Fusion on a Flower deployment (SuperLink + SuperNodes).")
app.add_typer(flower, name="flower")


@flower.command("app")
def flower_app(
    config: Path = typer.Argument(..., help="the server's run config (YAML): engine: flower, mode: deployment, "
                                            "contributors: [NAME, ...]"),
    out_dir: Path = typer.Argument(..., help="directory to write the Flower app to"),
    run_dir: Path | None = typer.Option(None, help="run directory on the SuperLink's machine"),
    resume: bool = typer.Option(False, "--resume", help="continue the run from its last finished iteration"),
) -> None:
    """Write the Flower app that `flwr run` submits to a SuperLink."""
    from coldfusion.collab.flower.deployment import write_app

    try:
        out = write_app(config, out_dir, run_dir, resume)
    except ColdFusionError as exc:
        _fail(exc)
    _done("Flower app written to", f"{out}\nsubmit it with: "
                  f"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 flwr run {out} <connection> --stream")


@flower.command("local")
def flower_local(
    config: Path = typer.Argument(..., help="a one-file run config (its tasks with their data), as for `run`"),
    workdir: Path | None = typer.Option(None, help="the server's and the nodes' directories (default: "
                                                   "<run dir>-flower)"),
) -> None:
    """Run the experiment on a real Flower deployment on this machine.

    The config is cut as a deployment keeps it apart: the server's config (contributors
    named, no task data) in WORKDIR/server/, each contributor's task file, node config and
    head directory in WORKDIR/nodes/NAME/. A SuperLink and one SuperNode per task run as
    separate processes on 127.0.0.1; all are stopped at the end.
    """
    from coldfusion.collab.flower.deployment import LocalFederation, split_run_config, write_app
    from coldfusion.config import load_config

    try:
        cfg = load_config(config)
        root = (workdir or cfg.output_dir / f"{cfg.name}-flower").resolve()
        server_config, nodes = split_run_config(config, root)
        app_dir = write_app(server_config, root / "server" / "app")
        with LocalFederation(root, nodes) as federation:
            _say(f"SuperLink on {federation.address}, {len(nodes)} SuperNodes; logs in {root}")
            finished = federation.run(app_dir, timeout=7 * 24 * 3600)
    except ColdFusionError as exc:
        _fail(exc)
    _say(finished.stdout[-4000:])
    if finished.returncode != 0:
        _fail(ColdFusionError(f"flwr run failed ({finished.returncode}): {finished.stderr[-2000:]}"))
    _done("run directory:", f"{cfg.output_dir / cfg.name}")


def main() -> None:  # pragma: no cover
    sys.exit(app())
