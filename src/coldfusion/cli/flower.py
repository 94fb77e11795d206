"""`coldfusion flower`: run ColD Fusion on a Flower deployment (SuperLink + SuperNodes)."""

from pathlib import Path

import typer

from coldfusion.cli.app import HELP, app, done, fail, say
from coldfusion.infra.errors import ColdFusionError

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
        fail(exc)
    done("Flower app written to", f"{out}\nsubmit it with: "
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
    from coldfusion.collab.config import load_config
    from coldfusion.collab.flower.deployment import LocalFederation, split_run_config, write_app

    try:
        cfg = load_config(config)
        root = (workdir or cfg.output_dir / f"{cfg.name}-flower").resolve()
        server_config, nodes = split_run_config(config, root)
        app_dir = write_app(server_config, root / "server" / "app")
        with LocalFederation(root, nodes) as federation:
            say(f"SuperLink on {federation.address}, {len(nodes)} SuperNodes; logs in {root}")
            finished = federation.run(app_dir, timeout=7 * 24 * 3600)
    except ColdFusionError as exc:
        fail(exc)
    say(finished.stdout[-4000:])
    if finished.returncode != 0:
        fail(ColdFusionError(f"flwr run failed ({finished.returncode}): {finished.stderr[-2000:]}"))
    done("run directory:", f"{cfg.output_dir / cfg.name}")
