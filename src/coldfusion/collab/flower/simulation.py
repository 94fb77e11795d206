"""Run a ColD Fusion experiment on Flower's simulation runtime, on this machine.

Each contributor is a simulated SuperNode whose partition id is its task's position in
the config; the ClientApp gives it that task and its node settings (the run's threads,
its heads under `<run dir>/heads`), exactly what a SuperNode's node config would. So
tasks stay with the simulated nodes: messages carry what a deployment's carry.
Contributors get `flower.client_cpus` CPUs each (default: `threads`), so on a machine of
that many cores they train one at a time, as with the local engine; on a machine with
GPUs (and a device other than cpu) each also gets `flower.client_gpus` of a GPU.
"""

import logging
import os
from pathlib import Path

from coldfusion.collab.config import RunConfig
from coldfusion.collab.local_engine import run_node
from coldfusion.infra.runtime import resolve_threads


def client_resources(config: RunConfig, gpus: int) -> dict[str, float]:
    """Each simulated contributor's share of a machine with `gpus` CUDA GPUs."""
    cpus = config.flower.client_cpus or resolve_threads(config.threads)
    use_gpus = gpus > 0 and config.device != "cpu"
    return {"num_cpus": cpus, "num_gpus": (config.flower.client_gpus or 1.0) if use_gpus else 0.0}


def run_on_simulation(config: RunConfig, run_dir: Path | None = None, resume: bool = False, progress=None,
                      client_mods: list | None = None) -> Path:
    """Run (or resume) `config` on Flower's simulation runtime; `client_mods` are Flower mods
    wrapped around every node's handlers (as a deployment's ClientApp could add its own)."""
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")  # never let Flower pip-install
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import torch
    from flwr.simulation import run_simulation

    from coldfusion.collab.flower.client_app import client_app_for
    from coldfusion.collab.flower.server_app import server_app_for

    run_dir = Path(run_dir or config.output_dir / config.name).resolve()
    nodes = [run_node(config, run_dir / "heads", spec) for spec in config.tasks]
    outcome: dict = {}
    resources = client_resources(config, torch.cuda.device_count())
    run_simulation(
        server_app=server_app_for(config, run_dir, resume, progress, outcome),
        client_app=client_app_for(nodes, client_mods),
        num_supernodes=len(nodes),
        backend_config={"client_resources": resources,
                        "init_args": {"num_cpus": max(resources["num_cpus"], os.cpu_count() or 1),
                                      "include_dashboard": False,
                                      "logging_level": logging.ERROR}})
    if "error" in outcome:
        raise outcome["error"]
    if "run_dir" not in outcome:
        raise RuntimeError("Flower's simulation ended without running the ServerApp; see the log above")
    return outcome["run_dir"]
