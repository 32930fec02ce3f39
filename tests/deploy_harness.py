"""Real Flower processes on 127.0.0.1 for the deployed tests: start, watch, kill whole trees.

Every process gets its own ``FLWR_HOME`` (never the user's ``~/.flwr``) and a log file, runs in
its own session, and is killed together with everything it spawned (Flower's SuperExec starts
detached children, so the tree is collected through ``/proc`` before anything is signalled).
A :class:`Federation` is deployed the way docs/DEPLOY.md says: the SuperLink on 127.0.0.1, the
hospitals' SuperNodes dialling the Fleet-only nginx proxy, each with its FAB gate beside it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from cldlr.client.deploy import clientapp_command
from cldlr.common.deploy.launch import Command, flower_command
from cldlr.common.deploy.pki import create_ca, create_node_keys, create_server_cert
from cldlr.server.deploy import register_command, superlink_command, write_connection
from cldlr.server.proxy import find_nginx, proxy_command

FAULTS_DIR = Path(__file__).resolve().parent / "deploy_faults"
CONNECTION = "test-link"
NGINX_MISSING = None if find_nginx() else "nginx is not installed: `make deploy-deps` (apt-get install nginx) before `-m slow`"
T = TypeVar("T")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], T], timeout: float, what: str, poll: float = 0.5) -> T:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> list[int]:
    """``pid``'s children, grandchildren, ... (detached sessions included, as long as parents live)."""
    tree, found, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie waiting for its reaper."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Proc:
    """One started Flower command with its log; ``kill()`` ends it and all it spawned."""

    def __init__(self, name: str, command: Command, *, workdir: Path, home: Path,
                 extra_env: Mapping[str, str] | None = None, log_name: str | None = None) -> None:
        self.name, self.command = name, command
        self.log_path = workdir / f"{log_name or name}.log"  # a SuperNode and its FAB gate share one (appends)
        home.mkdir(parents=True, exist_ok=True)
        env = {**command.environ(), "FLWR_HOME": str(home), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
               **(extra_env or {})}
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - open for the process's lifetime, closed by kill()
        self.popen = subprocess.Popen(list(command.argv), env=env, cwd=workdir, stdout=self._log,
                                      stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        """Everything the process (and its children) wrote so far, colour codes stripped."""
        return re.sub(r"\x1b\[[0-9;]*m", "", self.log_path.read_text(encoding="utf-8", errors="replace"))

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 30.0) -> bool:
        """What an operator does: one SIGTERM to the command itself; True if it and every process it
        started are gone within ``timeout`` (whatever is left is then killed)."""
        if self._log.closed:
            return True
        pids = [self.pid, *descendants(self.pid)]
        self.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(running(p) for p in pids):
            self.popen.poll()  # reap the command itself so that it does not linger as a zombie
            time.sleep(0.2)
        clean = not any(running(p) for p in pids)
        self.kill()
        return clean

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole tree (children first collected, then all at once), then reap; idempotent."""
        if self._log.closed:
            return
        pids = [self.pid, *descendants(self.pid)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        try:
            self.popen.wait(timeout=15)
        except subprocess.TimeoutExpired:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.popen.wait(timeout=15)
        self._log.close()


def run_cli(command: Command, *, home: Path, timeout: float = 60, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a short ``flwr``/``cldlr`` command to completion with its own FLWR_HOME."""
    env = {**command.environ(), "FLWR_HOME": str(home)}
    return subprocess.run(list(command.argv), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def flwr_json(args: Sequence[str], *, command: Callable[[str, Sequence[str]], Command], home: Path,
              timeout: float = 60) -> Any:
    """``flwr <args> --format json`` parsed (Flower prints the JSON last)."""
    result = run_cli(command("flwr", [*args, "--format", "json"]), home=home, timeout=timeout)
    text = result.stdout.strip()
    start = text.find("{")
    if start < 0:
        raise AssertionError(f"flwr {' '.join(args)} gave no JSON (rc {result.returncode}): {text}\n{result.stderr}")
    return json.loads(text[start:])


def ledger(run_dir: Path) -> list[dict[str, Any]]:
    """The run's ledger lines so far."""
    path = run_dir / "ledger.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def progress(run_dir: Path) -> dict[str, Any]:
    """The centre's checkpoint progress (completed rounds and their history), or {}."""
    path = run_dir / "checkpoints" / "progress.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def write_policy(path: Path, *, approved: Sequence[str], schema: Path, state: Path, min_parties: int = 2,
                 **extra: Any) -> Path:
    """A site policy that lets the test studies through (few sites, tiny cohorts) and pins ``approved`` FABs.

    ``extra`` adds or overrides policy keys (a stricter site, say).
    """
    path.write_text(yaml.safe_dump({
        "min_parties": min_parties, "min_class_count": 1, "share_training_metrics": True, "schema": str(schema),
        "approved_fabs": list(approved), "folders": {"state": str(state)}, **extra}))
    return path


@dataclass
class Federation:
    """Certificates, data and the processes of one test federation (all under ``root``)."""

    root: Path
    port: int = field(default_factory=free_port)
    proxy_port: int = field(default_factory=free_port)
    procs: dict[str, Proc] = field(default_factory=dict)

    @property
    def cli_home(self) -> Path:
        return self.root / "home-cli"

    @property
    def address(self) -> str:
        """The SuperLink itself: 127.0.0.1 only, for the centre's ``flwr`` CLI."""
        return f"127.0.0.1:{self.port}"

    @property
    def fleet_address(self) -> str:
        """What the hospitals dial: the nginx proxy in front of the SuperLink (Fleet API only)."""
        return f"127.0.0.1:{self.proxy_port}"

    def make_pki(self, sites: tuple[str, ...]) -> None:
        create_ca(self.root / "ca")
        create_server_cert(self.root / "superlink", ca_dir=self.root / "ca", hosts=[])
        for site in sites:
            create_node_keys(self.root / "keys", name=site)
        write_connection(CONNECTION, self.address, self.root / "ca" / "ca.crt", home=self.cli_home)

    def start(self, name: str, command: Command, env: Mapping[str, str] | None = None, log_name: str | None = None) -> Proc:
        proc = Proc(name, command, workdir=self.root, home=self.root / f"home-{name}", extra_env=env, log_name=log_name)
        self.procs[name] = proc
        return proc

    def start_superlink(self, name: str = "superlink") -> Proc:
        command = superlink_command(self.root / "superlink", port=self.port, database=self.root / "superlink.db")
        link = self.start(name, command)
        wait_for(lambda: "Uvicorn running" in link.log() or not link.alive(), 60, "the SuperLink to listen")
        assert link.alive(), link.log()
        return link

    def start_proxy(self) -> Proc:
        """``cldlr deploy proxy`` in front of the SuperLink, as its own nginx (own config, pid, temp folders)."""
        command = proxy_command(self.root / "superlink", self.root / "proxy", listen=self.fleet_address,
                                superlink=self.address)
        proxy = self.start("proxy", command)

        def listening() -> bool:
            assert proxy.alive(), proxy.log() + (self.root / "proxy" / "logs" / "error.log").read_text()
            try:
                with socket.create_connection(("127.0.0.1", self.proxy_port), timeout=1):
                    return True
            except OSError:
                return False

        wait_for(listening, 30, "nginx to listen", poll=0.2)
        return proxy

    def start_site(self, site: str, supernode: Command, policy: Path, env: Mapping[str, str] | None = None) -> Proc:
        """A hospital: its ``--isolation process`` SuperNode and, beside it, its FAB gate (one shared log)."""
        self.start(f"{site}-gate", clientapp_command(policy, port=int(supernode.argv[supernode.argv.index("--port") + 1])),
                   env, log_name=site)
        return self.start(site, supernode, env)

    def register(self, site: str) -> None:
        result = run_cli(register_command(self.root / "keys" / f"supernode-{site}.pub", CONNECTION), home=self.cli_home)
        assert result.returncode == 0 and "registered successfully" in result.stdout, result.stdout + result.stderr

    def node_key(self, site: str) -> Path:
        return self.root / "keys" / f"supernode-{site}.key"

    def nodes(self) -> list[dict[str, Any]]:
        return list(flwr_json(["supernode", "list", CONNECTION], command=flower_command, home=self.cli_home)["nodes"])

    def online(self) -> int:
        return sum(n["status"] == "online" for n in self.nodes())

    def flwr(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(flower_command("flwr", list(args)), home=self.cli_home)

    def close(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.kill()


def run_status(fed: Federation, run_id: str) -> str:
    """Run ``run_id``'s status as ``flwr ls`` gives it (e.g. ``finished:completed``), or ``unknown``."""
    runs = flwr_json(["ls", CONNECTION], command=flower_command, home=fed.cli_home).get("runs", [])
    return next((str(r.get("status", "")) for r in runs if str(r.get("run-id")) == run_id), "unknown")


def run_finished(fed: Federation, run_id: str) -> bool:
    """``flwr ls`` says run ``run_id`` is over (the ServerApp exits after writing the report)."""
    return run_status(fed, run_id).startswith("finished")


def run_diagnosis(fed: Federation, run_id: str, tail: int = 6000) -> str:
    """What to read when a run ended without its outputs: its status, the ServerApp's log and the SuperLink's."""
    status = run_status(fed, run_id)
    log = run_cli(flower_command("flwr", ["log", run_id, CONNECTION, "--show"]), home=fed.cli_home)
    link = next((p.log() for name, p in fed.procs.items() if name.startswith("superlink")), "")
    return (f"run {run_id} status {status}\n--- flwr log ---\n{(log.stdout + log.stderr)[-tail:]}"
            f"\n--- superlink ---\n{link[-tail:]}")
