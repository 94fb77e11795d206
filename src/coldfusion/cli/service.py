"""The always-on repository: `serve`, `token` (operator), `pull`, `push` (contributors)."""

from pathlib import Path

import typer

from coldfusion.cli.app import HELP, app, done, fail, open_repository, say, warn
from coldfusion.infra.errors import ColdFusionError

token = typer.Typer(no_args_is_help=True, context_settings=HELP,
                    help="Contributor tokens of a served repository (the operator's side).")
app.add_typer(token, name="token")

TOKEN_HELP = "the contributor's token (default: the COLDFUSION_TOKEN environment variable)"


@app.command()
def serve(
    repository: Path = typer.Argument(..., help="repository directory"),
    host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0: every interface)"),
    port: int = typer.Option(8000, min=0, max=65535, help="port to listen on"),
    config: Path | None = typer.Option(None, help="service settings (YAML): upload limit, stall timeout, when "
                                                  "and how to fuse; see the README"),
) -> None:
    """Serve the repository over HTTP: contributors pull versions and push contributions; the
    service fuses them as they arrive."""
    import uvicorn

    from coldfusion.service.app import create_app
    from coldfusion.service.settings import load_service_settings

    open_repository(repository)
    try:
        service = create_app(repository, load_service_settings(config))
    except ColdFusionError as exc:
        fail(exc)
    say(f"serving {repository} on http://{host}:{port} (Ctrl-C stops; nothing acknowledged is lost)")
    uvicorn.run(service, host=host, port=port, log_level="info", timeout_graceful_shutdown=10)


@token.command("issue")
def token_issue(repository: Path = typer.Argument(..., help="repository directory"),
                contributor: str = typer.Argument(..., help="who gets it")) -> None:
    """Issue a token for a contributor (printed once: only its hash is kept)."""
    from coldfusion.service.tokens import ServiceStore

    open_repository(repository)
    try:
        secret = ServiceStore(repository).issue(contributor)
    except ColdFusionError as exc:
        fail(exc)
    done(f"token for {contributor}:", secret)


@token.command("revoke")
def token_revoke(repository: Path = typer.Argument(..., help="repository directory"),
                 contributor: str = typer.Argument(..., help="whose tokens to revoke")) -> None:
    """Revoke every token of a contributor."""
    from coldfusion.service.tokens import ServiceStore

    open_repository(repository)
    n = ServiceStore(repository).revoke(contributor)
    if not n:
        fail(ColdFusionError(f"{contributor} has no live token"))
    done("revoked", f"{n} token(s) of {contributor}")


@token.command("list")
def token_list(repository: Path = typer.Argument(..., help="repository directory")) -> None:
    """Contributors with tokens (never the tokens)."""
    from coldfusion.service.tokens import ServiceStore

    open_repository(repository)
    for row in ServiceStore(repository).contributors():
        say(f"{row['contributor']}: {row['live']} live of {row['tokens']} issued, since {row['since']}")


@app.command()
def pull(
    url: str = typer.Argument(..., help="the service, e.g. http://127.0.0.1:8000"),
    version: str = typer.Argument("latest", help="'latest' (the newest published version), an id (3, v3) or a "
                                                 "checksum prefix of 8+ hex characters"),
    out: Path = typer.Argument(..., help="directory to write (AutoModel.from_pretrained loads it)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty OUT"),
) -> None:
    """Download a version as a Hugging Face model directory, every file checked (a version that
    is held back or abandoned comes with a warning, here and on its model card)."""
    from coldfusion.service.client import ServiceClient

    try:
        with ServiceClient(url) as client:
            listing = client.pull(version, out, overwrite)
    except ColdFusionError as exc:
        fail(exc)
    if listing.get("status", "live") != "live":
        warn(f"version {listing['version']} is {listing['status'].replace('_', ' ')}, not a published version: "
             f"{listing.get('held_back') or 'see its model card'}")
    done(f"version {listing['version']} written to", str(out))


@app.command()
def push(
    url: str = typer.Argument(..., help="the service, e.g. http://127.0.0.1:8000"),
    body: Path = typer.Argument(..., help="the finetuned body: a .safetensors file or a model directory"),
    base: str = typer.Option(..., help="the version it was finetuned from (id or checksum prefix)"),
    task: str = typer.Option(..., help="the task it was finetuned on"),
    examples: int = typer.Option(..., min=1, help="training examples it saw"),
    token_: str | None = typer.Option(None, "--token", help=TOKEN_HELP),
    encoding: str = typer.Option("full", help="what is sent: full (the body), delta (body - base, --dtype) or "
                                              "sparse (the largest --density share of delta entries)"),
    dtype: str = typer.Option("float16", help="delta and sparse: dtype of the values sent"),
    density: float = typer.Option(0.02, help="sparse: share of all delta entries sent"),
) -> None:
    """Send a contribution to the service; it answers with its id once it is stored."""
    from pydantic import ValidationError

    from coldfusion.encodings import EncodingSettings
    from coldfusion.infra.config_files import format_validation_error
    from coldfusion.service.client import ServiceClient

    try:
        try:
            settings = EncodingSettings(kind=encoding, dtype=dtype, density=density)
        except ValidationError as exc:
            raise ColdFusionError(format_validation_error(exc, "options")) from None
        with ServiceClient(url, token_) as client:
            reply = client.push(body, base, task, examples, settings)
    except ColdFusionError as exc:
        fail(exc)
    done("stored", f"contribution {reply['id']} ({reply['sha256'][:12]}) against version {reply['base_version']}: "
                   f"{reply['status']}")


@app.command("contribute-loop")
def contribute_loop_command(
    url: str = typer.Argument(..., help="the service, e.g. http://127.0.0.1:8000"),
    config: Path = typer.Argument(..., help="the private task and how to train on it (YAML; see the README)"),
    token_: str | None = typer.Option(None, "--token", help=TOKEN_HELP),
    workdir: Path = typer.Option(Path(".coldfusion-contributor"), help="where the model's files are kept"),
) -> None:
    """Contribute asynchronously: pull the newest base, finetune on the private task, push;
    repeat (for `rounds`, or until stopped)."""
    from coldfusion.cli.app import interrupted
    from coldfusion.service.client import ServiceClient
    from coldfusion.service.contribute_loop import contribute_loop, load_contribute_loop_config

    def report(r: dict) -> None:
        say(f"round {r['round']}: trained on version {r['base']} ({r['steps']} steps, validation accuracy "
            f"{r['validation_accuracy']}), sent contribution {r['contribution']}")

    try:
        settings = load_contribute_loop_config(config)
        with interrupted(f"coldfusion contribute-loop {url} {config}"), ServiceClient(url, token_) as client:
            client.me()  # a missing or refused token fails before any training
            pushed = contribute_loop(client, settings, workdir, on_round=report)
    except ColdFusionError as exc:
        fail(exc)
    done("done:", f"{pushed} contributions sent")
