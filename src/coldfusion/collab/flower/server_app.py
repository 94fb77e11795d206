"""The ServerApp: the ColD Fusion loop, with its contributors on Flower.

It holds no contributor's data: the run config names contributors (deployment) or the
tasks stay with the simulated nodes (simulation), and each base is scored by the
contributors themselves (evaluate messages) plus the server's own `evaluation.suite`.

`app` is what `flwr run` starts on a SuperLink (deployment): its run config names the
server's YAML (`config`), and optionally `run-dir` and `resume`. `server_app_for` builds
one around a config already in memory (simulation from `coldfusion run`).
"""

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from coldfusion.collab.config import RunConfig, load_config
from coldfusion.collab.flower.engine import FlowerEngine
from coldfusion.collab.loop import run_cold_fusion


def _engine_for(grid: Grid, config: RunConfig):
    return lambda run_dir, run_id: FlowerEngine(grid, config, run_id)


def server_app_for(config: RunConfig, run_dir: Path | None = None, resume: bool = False, progress=None,
                   outcome: dict | None = None) -> ServerApp:
    """A ServerApp that runs this config; `outcome` receives its run directory or its error
    (Flower logs a ServerApp's exception rather than raising it to the caller)."""
    outcome = {} if outcome is None else outcome
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            outcome["run_dir"] = run_cold_fusion(config, run_dir, resume, progress,
                                                 engine_for=_engine_for(grid, config))
        except BaseException as exc:  # handed to the caller, which raises it
            outcome["error"] = exc

    return server


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = context.run_config
    config = load_config(Path(str(settings["config"])))
    run_dir = Path(str(settings["run-dir"])) if settings.get("run-dir") else None
    run_cold_fusion(config, run_dir, bool(settings.get("resume", False)), engine_for=_engine_for(grid, config))
