"""The hospital's code gate: a run's ClientApp executes here only if this site approved its FAB (by sha256).

Flower 1.41 runs whatever ClientApp the run's FAB (Flower app bundle) carries, and the FAB comes
from the centre. Flower's own check, ``flower-supernode --trusted-entities``, accepts only FABs
the SuperLink delivers with Flower Hub's signatures: a FAB that ``flwr run`` packs locally always
arrives with no verification record, so it cannot pin a federation's own app (and it takes
ed25519 keys the hub signed with, not keys this federation makes). What Flower leaves to the site
is ``flower-supernode --isolation process``: the SuperNode then starts no ClientApp itself, and a
process the hospital starts claims each task from the SuperNode's local Runtime API, as
``flower-superexec`` would. This module is that process. For every task it claims:

* the FAB's hash is in the site policy's ``approved_fabs``: it starts Flower's own
  ``flwr-clientapp`` for the task (Flower's ``SubprocessExecutor``, the very command
  ``flower-superexec`` starts);
* otherwise the FAB is never unpacked nor imported: the gate takes the task's message, answers
  the centre with Flower's ``INVALID_FAB`` error, and logs the hash it refused.

The hash is the SuperNode's: it files every FAB under the sha256 of its content (a FAB whose
content does not match its hash is rejected on arrival), so the ClientApp of an approved task
receives exactly the approved bytes. The refusal path hashes the bytes itself.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import signal
import sys
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from types import FrameType
from typing import NoReturn

from flwr.app import Error, Message
from flwr.cli.build import build_fab_from_disk
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.proto.task_pb2 import Task
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.protobuf.client import ProtobufClientInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResultStatus, SubprocessExecutor
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from cldlr.client.policy import load_policy
from cldlr.common.errors import CldlrError
from cldlr.common.logs import configure_logging

log = logging.getLogger("cldlr.site.gate")

COMPONENT = "cldlr-fab-gate"
POLL_S = 1.0
STOP_GRACE_S = 10.0
APPROVED, REFUSED = "approved", "refused"
#: the task types a SuperNode creates from the centre's messages; anything but a ClientApp is refused
CLAIMED = (TaskType.CLIENT_APP, TaskType.AGENT_APP)


def fab_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 ``approved_fabs`` lists: of a ``.fab`` file's bytes, or of the FAB ``flwr run`` packs from a folder.

    A folder is packed with Flower's own ``build_fab_from_disk`` (fixed timestamps, sorted
    files), so the centre and a hospital holding the same release get the same hash.
    """
    target = Path(path).expanduser().resolve()
    if target.is_file():
        return hashlib.sha256(target.read_bytes()).hexdigest()
    if not (target / "pyproject.toml").is_file():
        raise CldlrError(f"{path}: neither a .fab file nor a Flower app folder (with pyproject.toml)")
    try:
        return hashlib.sha256(build_fab_from_disk(target)).hexdigest()
    except ValueError as exc:
        raise CldlrError(f"{path}: Flower cannot pack a FAB from it ({exc})") from exc


def approved_fabs(policy: str | os.PathLike[str]) -> frozenset[str]:
    """The FAB hashes the site's policy approves (an empty list refuses every run)."""
    approved = frozenset(load_policy(Path(policy)).approved_fabs)
    if not approved:
        log.warning("%s approves no FAB (approved_fabs: []): every run will be refused", policy)
    return approved


class FabGate:
    """Claims the SuperNode's tasks and starts a ClientApp only for an approved FAB."""

    def __init__(self, runtime_api_address: str, approved: Collection[str]) -> None:
        self.address = runtime_api_address
        self.approved = frozenset(approved)

    def _client(self, token: str | None = None) -> RuntimeHttpClient:
        interceptors: list[ProtobufClientInterceptor] = [RuntimeVersionHttpInterceptor(component_name=COMPONENT)]
        if token is not None:
            interceptors.append(RuntimeTokenHttpInterceptor(token))
        return RuntimeHttpClient.from_server_address(server_address=self.address, insecure=True, root_certificates=None,
                                                     interceptors=interceptors,
                                                     retry_invoker=make_simple_http_retry_invoker())

    def decide(self, task_type: str, fab_hash: str) -> str | None:
        """None when the task may run; else why not (for the site's log and the centre's error)."""
        if task_type != TaskType.CLIENT_APP:
            return f"task type {task_type!r} is not a ClientApp; this site runs only ClientApps"
        if fab_hash not in self.approved:
            return f"FAB {fab_hash or '(no hash)'} is not approved by this site's policy (approved_fabs)"
        return None

    def handle(self, task: Task, token: str) -> str:
        """Start the approved task's ClientApp, or refuse the task; returns ``approved`` or ``refused``."""
        reason = self.decide(task.type, task.fab_hash)
        if reason is None:
            self._launch(task, token)
            return APPROVED
        log.warning("run %s: REFUSED before any of its code ran: %s", task.run_id, reason)
        self._refuse(token, reason)
        return REFUSED

    def _launch(self, task: Task, token: str) -> None:
        """Flower's own ``flwr-clientapp --token ...``, exactly as ``flower-superexec`` would start it."""
        result = SubprocessExecutor().launch(ExecutionSpec(
            task_type=TaskType.CLIENT_APP, runtime_api_address=self.address, token=token, insecure=True,
            root_certificates_path=None, runtime_dependency_install=False, parent_pid=os.getpid(),
            suppress_output=False, task_id=task.task_id, fab_hash=task.fab_hash))
        if result.status == LaunchResultStatus.ACCEPTED:
            log.info("run %s: FAB %s approved, ClientApp started (task %s)", task.run_id, task.fab_hash, task.task_id)
        else:
            log.error("run %s: flwr-clientapp could not be started (%s)", task.run_id, result.message)

    def _refuse(self, token: str, reason: str) -> None:
        """Answer the task's message with ``INVALID_FAB`` without installing or importing anything of the FAB."""
        client = self._client(token)
        try:
            message, context, _run, fab = pull_task_input(client)
            actual = hashlib.sha256(fab.content).hexdigest()
            if actual != fab.hash_str:
                log.error("the SuperNode handed over a FAB whose content hashes to %s, not %s", actual, fab.hash_str)
            refusal = Message(Error(code=ErrorCode.INVALID_FAB, reason=f"refused by the site: {reason}"), reply_to=message)
            push_message(client, refusal, context)
        except Exception as exc:  # noqa: BLE001 - one broken task must not stop the gate; it stays refused
            log.error("could not deliver the refusal (%s: %s); the task expires unanswered", type(exc).__name__, exc)
        finally:
            try:
                push_task_output(client, None, SubStatus.FAILED, reason)
            except Exception as exc:  # noqa: BLE001 - same: the task is refused whatever the API answers
                log.error("could not close the refused task (%s: %s)", type(exc).__name__, exc)
            client.close()

    def serve(self, poll_s: float = POLL_S, max_tasks: int | None = None) -> None:
        """Claim tasks until stopped (or ``max_tasks`` were handled), like ``flower-superexec``'s loop."""
        client = self._client()
        handled = 0
        log.info("FAB gate on the SuperNode Runtime API %s: %d approved FAB(s)", self.address, len(self.approved))
        try:
            while max_tasks is None or handled < max_tasks:
                reply = client.AcquireTask(AcquireTaskRequest(supported_task_types=list(CLAIMED)))
                if reply.HasField("task") and reply.token:
                    self.handle(reply.task, reply.token)
                    handled += 1
                    continue
                time.sleep(poll_s)
        finally:
            client.close()


def _children() -> list[int]:
    """PIDs of this process's children (the ClientApps it started), read from /proc (Linux)."""
    me, found = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == me:
                    found.append(int(entry.name))
    return found


def stop_clientapps(grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM the ClientApps this gate started, SIGKILL what is left after ``grace_s``; reap them all.

    A ClientApp whose SuperNode went away first can hang in Flower's exit path (its task
    heartbeat keeps retrying the gone Runtime API), so one SIGTERM to the gate must not depend on
    the ClientApps' own shutdown.
    """
    pending = set(_children())
    for pid in pending:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while pending:
        for pid in list(pending):
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    pending.discard(pid)
            except ChildProcessError:
                pending.discard(pid)
        if pending and time.monotonic() > deadline:
            log.warning("ClientApp process(es) %s did not stop within %.0f s: killed", sorted(pending), grace_s)
            for pid in pending:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            deadline = float("inf")
        time.sleep(0.1)


def _stop(signum: int, _frame: FrameType | None) -> NoReturn:
    log.info("FAB gate stopping (%s): its ClientApps first", signal.Signals(signum).name)
    stop_clientapps()
    log.info("FAB gate stopped")
    sys.exit(0)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cldlr.client.fab_gate --policy FILE --runtime-api-address 127.0.0.1:9094``.

    What ``cldlr deploy clientapp`` prints and runs, beside a ``flower-supernode --isolation process``.
    """
    parser = argparse.ArgumentParser(prog="cldlr-fab-gate", description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--policy", type=Path, required=True, help="the site's policy file (approved_fabs)")
    parser.add_argument("--runtime-api-address", default="127.0.0.1:9094", help="the SuperNode's local Runtime API")
    args = parser.parse_args(argv)
    configure_logging()
    try:
        gate = FabGate(args.runtime_api_address, approved_fabs(args.policy))
    except CldlrError as exc:
        log.error("%s", exc)
        return 2
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop)
    gate.serve()
    return 0


__all__ = ["APPROVED", "REFUSED", "FabGate", "approved_fabs", "fab_sha256", "main", "stop_clientapps"]

if __name__ == "__main__":
    raise SystemExit(main())
