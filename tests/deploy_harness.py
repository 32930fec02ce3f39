"""Real Flower processes on 127.0.0.1 for tests/test_deployment.py: start, watch, kill whole trees.

Every process gets its own ``FLWR_HOME`` (never the user's ``~/.flwr``) and a log file, runs in
its own session, and is killed together with everything it spawned (Flower's SuperExec starts
detached children, so the tree is collected through ``/proc`` before anything is signalled).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from cldlr.common.deploy.launch import Command

FAULTS_DIR = Path(__file__).resolve().parent / "deploy_faults"
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
                 extra_env: Mapping[str, str] | None = None) -> None:
        self.name, self.command = name, command
        self.log_path = workdir / f"{name}.log"
        home.mkdir(parents=True, exist_ok=True)
        env = {**command.environ(), "FLWR_HOME": str(home), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
               **(extra_env or {})}
        self._log = open(self.log_path, "ab")
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
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        try:
            self.popen.wait(timeout=15)
        except subprocess.TimeoutExpired:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
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
