"""Flower command lines that ``cldlr deploy`` prints and (with ``--run``) executes, kept visible on purpose.

The wrappers never hide Flower: each builds the exact ``flower-superlink`` / ``flower-supernode`` /
``flwr`` command, prints it so an operator can copy it into a service file, and can hand the
process over to it. Two Flower 1.41 traps are handled here: the SuperLink and the SuperNode
start ``flower-superexec`` *by name*, so Flower's bin folder must be on ``PATH``; and Flower's
``k=v`` option parser knows no escapes, so values are quoted as TOML strings it can read.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from cldlr.common.errors import CldlrError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Command:
    """An argv plus the environment variables it needs on top of the caller's."""

    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)

    def text(self) -> str:
        """The command as one shell line (``PATH=...`` prefix included when needed)."""
        prefix = []
        for key, value in self.env.items():
            if key == "PATH" and value.endswith(os.pathsep + os.environ.get("PATH", "")):
                value = value[: -len(os.environ.get("PATH", ""))] + "$PATH"
                prefix.append(f'{key}="{value}"')
            else:
                prefix.append(f"{key}={shlex.quote(value)}")
        return " ".join(prefix + [shlex.join(self.argv)])

    def environ(self) -> dict[str, str]:
        """The full environment the command runs with."""
        return {**os.environ, **self.env}

    def exec(self) -> NoReturn:
        """Replace this process by the command (signals then reach Flower directly)."""
        sys.stdout.flush()
        sys.stderr.flush()
        os.execvpe(self.argv[0], list(self.argv), self.environ())


def flower_command(name: str, args: Sequence[str]) -> Command:
    """``name args...`` for a Flower executable of THIS environment, with its bin folder on PATH.

    The venv's own copy (next to the running Python) wins over anything else on PATH, so the
    SuperLink/SuperNode always run the flwr release cldlr was installed with.
    """
    local = Path(sys.executable).parent / name
    path = str(local) if local.is_file() else shutil.which(name)
    if path is None:
        raise CldlrError(f"{name} not found: install cldlr in this environment (it brings flwr 1.41), "
                         "or activate the environment it is installed in")
    folder = str(Path(path).parent)
    on_path = os.environ.get("PATH", "").split(os.pathsep)
    env: dict[str, str] = {}
    program = name
    if folder not in on_path or shutil.which(name) != path:
        # flower-superlink/-supernode start flower-superexec and flwr-clientapp by NAME
        env["PATH"] = folder + os.pathsep + os.environ.get("PATH", "")
    return Command((program, *args), env)


def python_command(module: str, args: Sequence[str]) -> Command:
    """``python -m module args...`` with THIS interpreter, Flower's bin folder on PATH.

    For cldlr's own long-running processes (the hospital's FAB gate): they start Flower's
    ``flwr-clientapp`` by name, exactly like ``flower-supernode`` does.
    """
    env = flower_command("flwr-clientapp", []).env
    return Command((sys.executable, "-m", module, *args), env)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``: addresses no other machine can reach."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def toml_string(value: str, what: str) -> str:
    """``value`` as a TOML string that Flower's ``k=v`` parser (no escapes) reads back unchanged."""
    if '"' not in value and "\\" not in value and "\n" not in value:
        return f'"{value}"'
    if "'" not in value and "\n" not in value:
        return f"'{value}'"
    raise CldlrError(f"{what} {value!r} mixes single and double quotes (or has a newline): Flower's "
                     "key=value options cannot carry it; rename the path or move the value into the YAML")


def key_values(pairs: Mapping[str, str | bool | int]) -> str:
    """``a="x" b=true`` as ``--node-config``/``--run-config`` expect it."""
    parts = []
    for key, value in pairs.items():
        if isinstance(value, bool):
            parts.append(f"{key}={'true' if value else 'false'}")
        elif isinstance(value, int):
            parts.append(f"{key}={value}")
        else:
            parts.append(f"{key}={toml_string(str(value), key)}")
    return " ".join(parts)


def check_address(address: str, what: str = "address") -> tuple[str, int]:
    """``host:port`` without a URL scheme (Flower rejects ``https://``); returns (host, port)."""
    if "://" in address:
        raise CldlrError(f"{what} {address!r}: give HOST:PORT without a scheme, e.g. 10.0.0.5:9092")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CldlrError(f"{what} {address!r}: expected HOST:PORT, e.g. superlink.example.org:9092")
    return host.strip("[]"), int(port)


def existing_file(path: str | os.PathLike[str], what: str, hint: str) -> Path:
    """The absolute path of a file that must exist (Flower resolves relative paths from its own cwd)."""
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise CldlrError(f"{what} {path} not found: {hint}")
    return resolved


def emit(command: Command, *, run: bool, notes: Sequence[str] = ()) -> str:
    """The text the CLI prints; with ``run`` the process becomes the command (never returns)."""
    if run:
        for note in notes:
            log.warning(note)
        log.info("exec: %s", command.text())
        command.exec()
    return "\n".join([*(f"# {n}" for n in notes), command.text()])


__all__ = ["Command", "check_address", "emit", "existing_file", "flower_command", "is_loopback", "key_values",
           "python_command", "toml_string"]
