"""Commands on a repository: storage, versions, export, adopt-model, contribute, fuse, verify."""

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from coldfusion.cli.app import app, console, done, fail, open_repository, say
from coldfusion.infra.errors import ColdFusionError


@app.command()
def storage(
    repository: Path = typer.Argument(..., help="repository directory (this replica's own: config and cache)"),
    index: str = typer.Option(..., help="postgresql://USER@HOST:PORT/DATABASE (password: PGPASSWORD or ~/.pgpass)"),
    objects: str = typer.Option(..., help="s3://BUCKET/PREFIX (keys: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"),
    s3_endpoint: str | None = typer.Option(None, help="an S3-compatible server's URL (default: AWS)"),
    s3_region: str = typer.Option("us-east-1", help="the bucket's region"),
) -> None:
    """Keep a repository in shared storage: its index in PostgreSQL, its bodies in an S3 bucket.
    Run it once per service replica, each with its own directory: they share one repository."""
    from pydantic import ValidationError

    from coldfusion.io.storage.settings import StorageSettings, write_settings
    from coldfusion.repository import Repository

    if Repository.exists_at(repository) and (repository / Repository.INDEX).exists():
        fail(ColdFusionError(f"{repository} holds a local repository (index.sqlite); shared storage starts empty: "
                             "give a new directory"))
    try:
        settings = StorageSettings(index=index, objects=objects, s3_endpoint=s3_endpoint, s3_region=s3_region)
    except ValidationError as exc:
        fail(ColdFusionError("; ".join(e["msg"] for e in exc.errors())))
    try:  # both reachable (bucket and tables made) before anything is written: a failure leaves all as it was
        from coldfusion.io.storage.index import PostgresIndex
        from coldfusion.io.storage.objects import S3Objects
        from coldfusion.repository.schema import create_index

        S3Objects(repository / "objects", settings.bucket, settings.prefix, s3_endpoint, s3_region).ensure_bucket()
        create_index(PostgresIndex(settings.index))
        write_settings(repository, settings)
        repo = Repository(repository)
    except ColdFusionError as exc:
        fail(exc)
    done("shared storage:", f"index {index}, objects {objects}; {len(repo.versions())} versions so far")


@app.command()
def versions(repository: Path = typer.Argument(..., help="repository directory")) -> None:
    """List the base versions of a repository: lineage, contributions fused and refused, and the
    mean linear-probe accuracy (acc) over the tasks that scored it."""
    repo = open_repository(repository)
    table = Table(title=f"versions in {repository}")
    for col in ("id", "parent", "iter", "method", "fused", "refused", "sha256", "acc"):
        whole = col not in ("fused", "refused")  # lists of ids wrap; nothing else is cut
        table.add_column(col, no_wrap=whole, overflow="fold", justify="right" if col == "acc" else "left",
                         ratio=1 if not whole else None)
    for v in repo.versions():
        accs = [m["values"]["accuracy"] for m in repo.metrics(v.id) if m["protocol"] == "linear_probe"]
        fusion = v.fusion or {}
        iteration = "-" if v.iteration is None else str(v.iteration)
        iteration += "" if v.live else f" ({v.status.replace('_', ' ')})"
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
    from coldfusion.repository.export import export_version

    repo = open_repository(repository)
    try:
        v, out = export_version(repo, version, out_dir, overwrite)
    except ColdFusionError as exc:
        fail(exc)
    say(f"exported version {v.id} ({v.sha256[:12]}) to {out} (model card: {out / 'README.md'})")


@app.command("adopt-model")
def adopt_model(
    repository: Path = typer.Argument(..., help="repository directory"),
    model: str = typer.Argument(..., help="the pretrained model its versions were made from: 'default' or a "
                                         "model directory"),
) -> None:
    """Store a model's config and tokenizer files in a repository made before they were stored,
    so that it exports and evaluates without the model directory."""
    from coldfusion.models.names import portable_name, resolve_model_source

    repo = open_repository(repository)
    try:
        directory = Path(resolve_model_source(model))
        if not directory.is_dir():
            raise ColdFusionError(f"'{model}' is not a model directory (nor 'default')")
        ids = repo.adopt_model(directory, portable_name(model))
    except ColdFusionError as exc:
        fail(exc)
    say(f"stored the files of {portable_name(model)} for {len(ids)} versions that had none")


@app.command()
def contribute(
    repository: Path = typer.Argument(..., help="repository directory"),
    upload: Path = typer.Argument(..., help="the finetuned body: a .safetensors file or a model directory"),
    base: str = typer.Option(..., help="the version it was finetuned from: an id (3, v3), 'latest' or a checksum "
                                       "prefix of 8+ hex characters"),
    contributor: str = typer.Option(..., help="who sends it"),
    task: str = typer.Option(..., help="the task it was finetuned on"),
    examples: int = typer.Option(..., min=1, help="training examples it saw (weights 'weighted' fusion)"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="UNSAFE: accept a pickle (.bin/.pt)"),
) -> None:
    """Add a contribution finetuned outside a run: admitted under the repository's rules (the
    README's operator section) or refused with the rule it broke; `coldfusion fuse` fuses it."""
    from coldfusion.repository.uploads import store_upload

    repo = open_repository(repository)
    try:
        c = store_upload(repo, upload, base, contributor, task, examples, allow_pickle)
    except ColdFusionError as exc:
        fail(exc)
    say(f"stored contribution {c.id} ({c.sha256[:12]}) from {contributor}, trained from version {c.base_version}")


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
    max_staleness: int | None = typer.Option(None, help="refuse a contribution whose base is more than this many "
                                                        "versions behind"),
    staleness_exponent: float = typer.Option(0.0, help="weigh a contribution s versions behind by (1 + s)^-a"),
    outer_lr: float = typer.Option(1.0, help="outer optimizer: step size on base - fused (1 with momentum 0: "
                                             "plain fusion; DiLoCo: 0.7)"),
    outer_momentum: float = typer.Option(0.0, help="outer optimizer: momentum (DiLoCo: 0.9); its buffer continues "
                                                   "the one stored with the base version"),
    nesterov: bool = typer.Option(False, "--nesterov", help="outer optimizer: Nesterov momentum"),
) -> None:
    """Validate contributions and fuse those that pass into a new version (refusals are recorded)."""
    import re

    import yaml
    from pydantic import ValidationError

    from coldfusion.infra.config_files import format_validation_error
    from coldfusion.repository.outer import OuterSettings
    from coldfusion.repository.validation import ValidationSettings

    repo = open_repository(repository)
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
                                          max_delta_norm=max_delta_norm, stale=stale, max_staleness=max_staleness,
                                          staleness_exponent=staleness_exponent)
            outer = OuterSettings(lr=outer_lr, momentum=outer_momentum, nesterov=nesterov)
        except ValidationError as exc:
            raise ColdFusionError(format_validation_error(exc, "options")) from None
        onto = repo.resolve(base or "latest")
        if contributions:
            if not re.fullmatch(r"\d+(,\d+)*", contributions.replace(" ", "")):
                raise ColdFusionError(f"--contributions {contributions}: expected comma-separated ids, e.g. 3,4")
            ids = [int(x) for x in contributions.replace(" ", "").split(",")]
        else:
            ids = [c.id for c in repo.uploads_waiting()]
        if not ids:
            raise ColdFusionError(f"no contributions waiting to be fused in {repository}")
        version = repo.fuse(onto.id, ids, method=method, params=params, validation=settings, outer=outer)
    except ColdFusionError as exc:
        fail(exc)
    fusion = version.fusion
    say(f"version {version.id} = {method} of contributions {fusion['contributions']} onto version {onto.id}")
    for cid, why in fusion.get("rejected", {}).items():
        console.print(Text.assemble(("refused", "yellow"), f" contribution {cid}: {why}"), highlight=False)
    for cid, moved in fusion.get("rebased", {}).items():
        say(f"rebased contribution {cid} from version {moved['from_version']}")
    if "outer" in fusion:
        o = fusion["outer"]
        say(f"outer step: lr {o['lr']}, momentum {o['momentum']}{' (Nesterov)' if o['nesterov'] else ''}, "
            + (f"continuing the buffer of version {o['momentum_from']}" if o["momentum_from"] else "a new buffer"))


@app.command()
def verify(
    repository: Path = typer.Argument(..., help="repository directory"),
    clean: bool = typer.Option(False, "--clean", help="delete what interrupted writes left behind, once it is "
                                                      "--min-age old"),
    min_age: float = typer.Option(60.0, "--min-age", min=0.0, metavar="MINUTES",
                                  help="with --clean, keep what is younger: a running service or replica may "
                                       "not have indexed its newest objects yet (0: only while nothing else "
                                       "writes)"),
) -> None:
    """Check a repository: its index, and every stored file against its checksum."""
    report = open_repository(repository).verify(clean=clean, min_age_seconds=min_age * 60)
    for problem in report.problems:
        Console(stderr=True).print(Text.assemble(("damaged:", "bold red"), f" {problem}"), highlight=False)
    left = len(report.temporary) + len(report.unreferenced)
    verb = "deleted" if report.cleaned else "found (harmless; --clean deletes them)"
    if left:
        say(f"{verb}: {len(report.temporary)} temporary files, {len(report.unreferenced)} unindexed objects "
                      "left by interrupted writes"
            + (f", except {report.recent} younger than {min_age:g} minutes (kept: a writer may still index them)"
               if report.recent else ""))
    if report.without_model_files:
        say(f"note: {len(report.without_model_files)} versions name their model only by a path, so they cannot be "
             f"exported or evaluated once it is gone; store its files with `coldfusion adopt-model {repository} "
             "MODEL`")
    if not report.ok:
        raise typer.Exit(code=1)
    done("ok:", f"{report.checkpoints} checkpoints match their checksums; the index is consistent")
