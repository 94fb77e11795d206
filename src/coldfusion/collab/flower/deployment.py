"""A real Flower deployment: a SuperLink, one SuperNode per contributor, `flwr run`.

- `write_app(config, out_dir)`: the Flower app directory that `flwr run` submits. Its
  components are this package's ServerApp and ClientApp (every machine has coldfusion
  installed, so nothing is installed at run time); its run config names the server's
  YAML, which names contributors and holds none of their data.
- `split_run_config(config, root)`: a one-file run config (tasks with their data) cut
  into what a deployment keeps apart: the server's config under `root/server/`, and
  each contributor's task file and node config under `root/nodes/NAME/`.
- `write_connection(flwr_home, name, address, ...)`: the SuperLink connection that
  `flwr run APP NAME` uses, in a Flower home of its own (`FLWR_HOME`).
- `LocalFederation`: a SuperLink and SuperNodes as separate processes on 127.0.0.1 (for
  tests and benchmarks, and to try a deployment on one machine), the SuperLink working
  in `root/server/`, each SuperNode in `root/nodes/NAME/`. Every process it starts is
  stopped, with its children, when it exits.

Pitfalls handled here: runtime dependency installation is disabled (otherwise Flower
may pip-install into the environment, e.g. a CUDA torch), each federation has its own
FLWR_HOME, and everything binds to 127.0.0.1. One module because the four parts share one
directory layout (root/server/, root/nodes/NAME/) and these pitfalls.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import closing, suppress
from pathlib import Path

import yaml

from coldfusion.infra.errors import ColdFusionError

NO_INSTALL = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}

APP_TOML = """\
# A Flower app that runs one ColD Fusion experiment (written by coldfusion).
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "coldfusion-{name}"
version = "1.0.0"
description = "ColD Fusion run '{name}' on Flower"
license = "Apache-2.0"
dependencies = []  # every SuperLink and SuperNode machine has coldfusion installed

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "coldfusion"

[tool.flwr.app.components]
serverapp = "coldfusion.collab.flower.server_app:app"
clientapp = "coldfusion.collab.flower.client_app:app"

[tool.flwr.app.config]
config = "{config}"  # the run's YAML, as the ServerApp's machine sees it
run-dir = "{run_dir}"
resume = {resume}
"""


def write_app(config: Path, out_dir: Path, run_dir: Path | None = None, resume: bool = False) -> Path:
    """Write the Flower app directory for the run config at `config`; return it. The run
    directory (default: <output_dir>/<name>) is made absolute here, so it does not depend
    on the directory the SuperLink runs the ServerApp in."""
    from coldfusion.collab.config import load_config

    cfg = load_config(config)  # fails now on a bad config, not inside the SuperLink
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "pyproject.toml").write_text(APP_TOML.format(
        name=cfg.name.replace("_", "-"), config=Path(config).resolve(),
        run_dir=Path(run_dir or cfg.output_dir / cfg.name).resolve(), resume=str(resume).lower()))
    return out_dir


def split_run_config(config: Path, root: Path) -> tuple[Path, dict[str, dict]]:
    """Cut a one-file run config into a deployment's parts: the server's config
    (`root/server/run.yaml`: contributors named, no task data, relative paths made
    absolute) and, per contributor, its task file and node config (`root/nodes/NAME/`).
    Returns the server config's path and each contributor's node config."""
    from coldfusion.collab.config import dump_config, load_config
    from coldfusion.infra.names import check_name

    cfg = load_config(config)
    if cfg.deployment:
        raise ColdFusionError(f"{config} is already a deployment's server config (it names contributors, not "
                              f"their data); start its SuperNodes with their own tasks and submit it with flwr run")
    root = Path(root).resolve()
    model_dir = Path(cfg.model).resolve() if Path(cfg.model).is_dir() else None  # each node gets the path
    nodes = {}
    for spec in cfg.tasks:
        home = root / "nodes" / check_name(spec.name, "task")
        home.mkdir(parents=True, exist_ok=True)
        task_file = home / "task.yaml"
        task_file.write_text(yaml.safe_dump(_absolute(spec).model_dump(mode="json", exclude_none=True)))
        nodes[spec.name] = {"task": str(task_file), "state-dir": str(home / "state"), "device": cfg.device,
                            "precision": cfg.precision, **({"threads": cfg.threads} if cfg.threads != "auto" else {}),
                            **({"model": str(model_dir)} if model_dir else {})}
    server = cfg.model_copy(update={
        "tasks": [], "contributors": [t.name for t in cfg.tasks], "engine": "flower",
        "evaluation": cfg.evaluation.model_copy(update={"suite": [_absolute(s) for s in cfg.evaluation.suite]}),
        "flower": cfg.flower.model_copy(update={"mode": "deployment"}),
        "output_dir": cfg.output_dir.resolve(), "repository": cfg.repository and cfg.repository.resolve(),
        "model": str(model_dir) if model_dir else cfg.model})
    (root / "server").mkdir(parents=True, exist_ok=True)
    path = root / "server" / "run.yaml"
    path.write_text(dump_config(server))
    return path, nodes


def _absolute(spec):
    """A task spec whose files are named by absolute paths (the processes run elsewhere)."""
    files = {k: Path(v).resolve() for k, v in spec.model_dump(include={"path", "train", "validation", "test"}).items()
             if v is not None}
    return spec.model_copy(update=files)


def node_config_arg(settings: dict) -> str:
    """A node config as `flower-supernode --node-config` takes it: key='text' or key=number."""
    def value(v) -> str:
        if isinstance(v, bool | int | float):
            return str(v).lower() if isinstance(v, bool) else str(v)
        text = str(v)
        if "'" in text:
            raise ColdFusionError(f"node config values cannot hold a single quote: {text!r}")
        return f"'{text}'"
    return " ".join(f"{k}={value(v)}" for k, v in settings.items())


def write_connection(flwr_home: Path, name: str, address: str, root_certificates: Path | None = None) -> None:
    """Add the SuperLink connection `name` (the default) to FLWR_HOME/config.toml."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    security = f'root-certificates = "{root_certificates}"' if root_certificates else "insecure = true"
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n{security}\n')


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc; Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def is_running(pid: int) -> bool:
    """Running (a zombie, finished but not yet reaped by its parent, counts as stopped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ColdFusionError(f"{process.args[0]} exited with {process.returncode}:\n{log.read_text()[-2000:]}")
        with closing(socket.socket()) as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise ColdFusionError(f"{process.args[0]} did not listen on 127.0.0.1:{port} within {timeout:g} s")


class LocalFederation:
    """A SuperLink and one SuperNode per contributor on 127.0.0.1.

    `nodes` maps a contributor's name to its node config (`task`, `state-dir`, ...; see
    collab/node.py). The SuperLink works in `root/server/` (its log, FLWR_HOME and its
    state database `state.db`; it deletes messages once they are delivered); each
    SuperNode in `root/nodes/NAME/` (its log). With `tls=(ca, cert, key)` the SuperLink serves HTTPS
    and the SuperNodes and the CLI verify it against the CA. With `authenticate`, the
    SuperLink accepts only SuperNodes whose public key was registered (`flwr supernode
    register`) and each SuperNode signs its requests with its private key.
    """

    def __init__(self, root: Path, nodes: dict[str, dict], tls: tuple[Path, Path, Path] | None = None,
                 authenticate: bool = False):
        if authenticate and tls is None:
            raise ColdFusionError("SuperNode authentication needs TLS: pass tls=make_certificates(...)")
        self.root, self.nodes, self.tls, self.authenticate = Path(root), nodes, tls, authenticate
        self.server = self.root / "server"
        self.home = self.server / "flwr-home"
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.processes: dict[str, subprocess.Popen] = {}
        self.stopped: set[int] = set()  # every pid it stopped, children included
        # Flower starts its helpers (flower-superexec, flwr-serverapp, ...) by name: put ours first.
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        self.env = {**os.environ, **NO_INSTALL, "FLWR_HOME": str(self.home), "PATH": path}

    def _bin(self, name: str) -> str:
        return str(Path(sys.executable).with_name(name))

    def log(self, label: str) -> Path:
        """The log of a process: `superlink`, or a SuperNode's label."""
        return self.server / "superlink.log" if label == "superlink" else self.root / "nodes" / label / "supernode.log"

    def _start(self, label: str, args: list[str], cwd: Path) -> subprocess.Popen:
        cwd.mkdir(parents=True, exist_ok=True)
        log = open(self.log(label), "w")  # noqa: SIM115 (closed with the process)
        # Its own session, so stopping it stops the processes it starts (SuperExec, apps).
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=cwd,
                                   start_new_session=True)
        self.processes[label] = process
        return process

    def _security(self, for_link: bool) -> list[str]:
        if self.tls is None:
            return ["--insecure"]
        ca, cert, key = self.tls
        if for_link:
            return ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
        return ["--root-certificates", str(ca)]

    def __enter__(self) -> "LocalFederation":
        self.server.mkdir(parents=True, exist_ok=True)
        write_connection(self.home, "local", self.address, self.tls[0] if self.tls else None)
        try:
            link = self._start("superlink", [self._bin("flower-superlink"), *self._security(True),
                                             *(["--enable-supernode-auth"] if self.authenticate else []),
                                             "--disable-runtime-dependency-installation",
                                             "--database", str(self.server / "state.db"),
                                             "--host", "127.0.0.1", "--port", str(self.port)], self.server)
            _wait_for_port(self.port, link, self.log("superlink"))
            for name in self.nodes:
                self.start_node(name)
        except BaseException:
            self.stop()
            raise
        return self

    def register(self, public_key: Path) -> None:
        """Allow the SuperNode with this public key in (`flwr supernode register`)."""
        done = subprocess.run([self._bin("flwr"), "supernode", "register", str(public_key), "local"], env=self.env,
                              cwd=self.server, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise ColdFusionError(f"flwr supernode register failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")

    def start_node(self, name: str, label: str | None = None, register: bool = True) -> subprocess.Popen:
        """Start (or restart) the SuperNode of contributor `name` with its node config
        (`label`: its process name and directory, default NAME). When SuperNodes must
        authenticate it gets a key pair, registered first unless `register` is False (a node
        the SuperLink must refuse)."""
        label, port, auth = label or name, free_port(), []
        home = self.root / "nodes" / label
        if self.authenticate:
            from coldfusion.collab.flower.security import make_supernode_key

            private, public = make_supernode_key(home / "keys", label)
            if register:
                self.register(public)
            auth = ["--auth-supernode-private-key", str(private)]
        node = self._start(label, [
            self._bin("flower-supernode"), *self._security(False), *auth, "--superlink", self.address,
            "--host", "127.0.0.1", "--port", str(port),
            "--node-config", node_config_arg(self.nodes[name])], home)
        _wait_for_port(port, node, self.log(label))
        return node

    def kill_node(self, label: str) -> None:
        """Kill a SuperNode and whatever it started (SIGKILL: a crash)."""
        self._signal(self.processes.pop(label), signal.SIGKILL)

    def run(self, app: Path, timeout: float = 1800, stream: bool = True) -> subprocess.CompletedProcess:
        """`flwr run APP local` against this federation; with `stream`, wait until the run ends."""
        return subprocess.run([self._bin("flwr"), "run", str(app), "local", *(["--stream"] if stream else [])],
                              env=self.env, cwd=self.server, capture_output=True, text=True, timeout=timeout)

    def _signal(self, process: subprocess.Popen, sig: int) -> None:
        """Signal the process and every descendant (Flower detaches its SuperExec into a
        session of its own, so its process group is not enough); SIGKILL what is left."""
        family = [process.pid, *_descendants(process.pid)]
        self.stopped |= set(family)
        for signum in (sig, signal.SIGKILL):
            for pid in family:
                with suppress(ProcessLookupError):
                    os.kill(pid, signum)
            with suppress(subprocess.TimeoutExpired):
                process.wait(timeout=20)
            if not any(is_running(pid) for pid in family):
                break

    def stop(self) -> None:
        """Stop every process this federation started (SuperNodes first), by process group."""
        for label in sorted(self.processes, key=lambda k: k == "superlink"):
            self._signal(self.processes[label], signal.SIGTERM)
        self.processes.clear()

    def __exit__(self, *exc) -> None:
        self.stop()
