"""A real Flower deployment: a SuperLink, one SuperNode per contributor, `flwr run`.

- `write_app(config, out_dir)`: the Flower app directory that `flwr run` submits. Its
  components are this package's ServerApp and ClientApp (every machine has coldfusion
  installed, so nothing is installed at run time); its run config names the run's YAML.
- `write_connection(flwr_home, name, address, ...)`: the SuperLink connection that
  `flwr run APP NAME` uses, in a Flower home of its own (`FLWR_HOME`).
- `LocalFederation`: a SuperLink and SuperNodes as separate processes on 127.0.0.1 (for
  tests and benchmarks, and to try a deployment on one machine). Every process it starts
  is stopped, with its children, when it exits.

Pitfalls handled here: runtime dependency installation is disabled (otherwise Flower
may pip-install into the environment, e.g. a CUDA torch), each federation has its own
FLWR_HOME, and everything binds to 127.0.0.1.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import closing, suppress
from pathlib import Path

from coldfusion.errors import ColdFusionError

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
    from coldfusion.config import load_config

    cfg = load_config(config)  # fails now on a bad config, not inside the SuperLink
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "pyproject.toml").write_text(APP_TOML.format(
        name=cfg.name.replace("_", "-"), config=Path(config).resolve(),
        run_dir=Path(run_dir or cfg.output_dir / cfg.name).resolve(), resume=str(resume).lower()))
    return out_dir


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
    """A SuperLink and one SuperNode per task on 127.0.0.1, in `root` (logs, FLWR_HOME).

    `tasks` maps a name to its node config `task` (a built-in task name or a task-spec
    YAML). With `tls=(ca, cert, key)` the SuperLink serves HTTPS and the SuperNodes and
    the CLI verify it against the CA. With `authenticate`, the SuperLink accepts only
    SuperNodes whose public key was registered (`flwr supernode register`) and each
    SuperNode signs its requests with its private key.
    """

    def __init__(self, root: Path, tasks: dict[str, str], tls: tuple[Path, Path, Path] | None = None,
                 authenticate: bool = False):
        if authenticate and tls is None:
            raise ColdFusionError("SuperNode authentication needs TLS: pass tls=make_certificates(...)")
        self.root, self.tasks, self.tls, self.authenticate = Path(root), tasks, tls, authenticate
        self.home = self.root / "flwr-home"
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.processes: dict[str, subprocess.Popen] = {}
        self.stopped: set[int] = set()  # every pid it stopped, children included
        # Flower starts its helpers (flower-superexec, flwr-serverapp, ...) by name: put ours first.
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        self.env = {**os.environ, **NO_INSTALL, "FLWR_HOME": str(self.home), "PATH": path}

    def _bin(self, name: str) -> str:
        return str(Path(sys.executable).with_name(name))

    def _start(self, label: str, args: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{label}.log", "w")  # noqa: SIM115 (closed with the process)
        # Its own session, so stopping it stops the processes it starts (SuperExec, apps).
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.root,
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
        self.root.mkdir(parents=True, exist_ok=True)
        write_connection(self.home, "local", self.address, self.tls[0] if self.tls else None)
        try:
            link = self._start("superlink", [self._bin("flower-superlink"), *self._security(True),
                                             *(["--enable-supernode-auth"] if self.authenticate else []),
                                             "--disable-runtime-dependency-installation",
                                             "--host", "127.0.0.1", "--port", str(self.port)])
            _wait_for_port(self.port, link, self.root / "superlink.log")
            for name in self.tasks:
                self.start_node(name)
        except BaseException:
            self.stop()
            raise
        return self

    def register(self, public_key: Path) -> None:
        """Allow the SuperNode with this public key in (`flwr supernode register`)."""
        done = subprocess.run([self._bin("flwr"), "supernode", "register", str(public_key), "local"], env=self.env,
                              cwd=self.root, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise ColdFusionError(f"flwr supernode register failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")

    def start_node(self, name: str, label: str | None = None, register: bool = True) -> subprocess.Popen:
        """Start (or restart) the SuperNode of contributor `name` (`label`: its process and
        log name, default `supernode-NAME`). When SuperNodes must authenticate it gets a key
        pair, registered first unless `register` is False (a node the SuperLink must refuse)."""
        label, port, auth = label or f"supernode-{name}", free_port(), []
        if self.authenticate:
            from coldfusion.collab.flower.security import make_supernode_key

            private, public = make_supernode_key(self.root / "keys", label)
            if register:
                self.register(public)
            auth = ["--auth-supernode-private-key", str(private)]
        node = self._start(label, [
            self._bin("flower-supernode"), *self._security(False), *auth, "--superlink", self.address,
            "--host", "127.0.0.1", "--port", str(port), "--node-config", f"task='{self.tasks[name]}'"])
        _wait_for_port(port, node, self.root / f"{label}.log")
        return node

    def kill_node(self, name: str) -> None:
        """Kill contributor `name`'s SuperNode and whatever it started (SIGKILL: a crash)."""
        self._signal(self.processes.pop(f"supernode-{name}"), signal.SIGKILL)

    def run(self, app: Path, timeout: float = 1800, stream: bool = True) -> subprocess.CompletedProcess:
        """`flwr run APP local` against this federation; with `stream`, wait until the run ends."""
        return subprocess.run([self._bin("flwr"), "run", str(app), "local", *(["--stream"] if stream else [])],
                              env=self.env, cwd=self.root, capture_output=True, text=True, timeout=timeout)

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
