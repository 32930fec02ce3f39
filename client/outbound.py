"""Everything that leaves the site passes here: the ClientApp's outermost mod audits and scrubs it.

Flower turns an exception raised in a ClientApp into an error reply whose reason is the
exception's text (``"<class '...'>:<'...'>"``, also in simulation), so whatever a message says
reaches the centre and its ledger: a bound violation used to carry ``element 4 = -0.292683``, the
true Σ age of one class at this site. :func:`make_outbound_mod` wraps every handler and mod of the
site's ClientApp and

- answers every exception itself, with a short fixed reason per kind of error (a policy refusal's
  ``public`` text, "a value exceeds its secure-sum bound", "this site's data failed validation;
  see the site's log" …); the full text and traceback go to the site's log;
- writes an :class:`~cldlr.client.audit.AuditEntry` for every reply and every refusal to the site's
  ``audit.jsonl`` *before* the reply is handed back to Flower: record keys, kinds, shapes and
  bytes, never values. A reply whose audit line cannot be written is not sent.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from cldlr.client.audit import AuditEntry, AuditLog, RecordSummary
from cldlr.client.policy import PolicyRefusal, SitePolicy
from cldlr.common.errors import CldlrError, ContractError
from cldlr.common.secure.payload import batch_label
from cldlr.common.secure.sums import SPEC_KEY, SecureSumError
from cldlr.common.secure.tasks import FINALIZE, HANDSHAKE, LOCAL_METRICS, PLAIN_SUM

log = logging.getLogger("cldlr.site")

PHASES = {HANDSHAKE: "handshake", PLAIN_SUM: "plain-sum", LOCAL_METRICS: "local-metrics", FINALIZE: "finalize",
          MessageType.TRAIN: "train"}
_TASK_KEY = "cldlr.audit.secure-task"  # the secure-sum task of the current SecAgg+ round, for its unmask stage
GENERIC = "the site could not answer this request; see the site's log"
BUDGET = "the site's privacy budget does not allow this training"


class PublicError(CldlrError):
    """A failure whose ``public`` text the centre may read: it says what went wrong, never a value.

    ``detail`` (default: the public text) is for the site's own log and audit file.
    """

    def __init__(self, public: str, detail: str | None = None) -> None:
        super().__init__(detail or public)
        self.public = public
        self.detail = detail or public


def public_reason(exc: BaseException) -> str:
    """The one line the centre is told about ``exc``: fixed per kind of error, free of the site's values."""
    if isinstance(exc, PolicyRefusal):
        return str(exc)  # "refused by the site's policy: <public>" (PolicyRefusal keeps its detail apart)
    if isinstance(exc, PublicError):
        return exc.public
    if isinstance(exc, ContractError):
        return "this site's data failed validation; see the site's log"
    # the DP modules import Opacus: an exception of theirs exists only if they were imported
    for module, name in (("cldlr.client.privacy", "PrivacyBudgetError"), ("cldlr.client.privacy_ledger", "LifetimeBudgetError")):
        kind = getattr(sys.modules.get(module), name, None)
        if isinstance(kind, type) and isinstance(exc, kind):
            return BUDGET
    if isinstance(exc, SecureSumError):
        return "this site could not compute its part of the secure sum; see the site's log"
    return f"{GENERIC} ({type(exc).__name__})"


def _detail(exc: BaseException) -> str:
    detail = getattr(exc, "detail", None)
    return detail if isinstance(detail, str) and detail else f"{type(exc).__name__}: {exc}"


def message_phase(msg: Message, context: Context) -> str:
    """What a message is part of, for the audit: handshake, train, ``secure-sum <task>: <stage>`` …

    Read before the message is handled: Flower's SecAgg+ mod pops the stage out of its content.
    """
    kind = msg.metadata.message_type
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.has_content() else None
    if kind != MessageType.TRAIN or configs is None:
        return PHASES.get(kind, kind)
    stage = str(configs.get(Key.STAGE, "?"))
    task = ""
    if stage == Stage.SETUP:  # a new round: the task is named only at its collect stage
        context.state.config_records.pop(_TASK_KEY, None)
    fitins = msg.content.config_records.get("fitins.config")
    if fitins is not None and SPEC_KEY in fitins:
        try:
            spec = json.loads(str(fitins[SPEC_KEY]))
            task = batch_label(str(spec["task"]), spec.get("payload") or {})
        except (ValueError, KeyError, TypeError, AttributeError):
            task = "(malformed request)"
        context.state.config_records[_TASK_KEY] = ConfigRecord({"task": task})
    elif stage == Stage.UNMASK and _TASK_KEY in context.state.config_records:
        task = str(context.state.config_records[_TASK_KEY]["task"])
    return f"secure-sum {task}: {stage}" if task else f"secure-sum: {stage}"


def _value_bytes(value: object) -> int:
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, list):
        return sum(_value_bytes(v) for v in value)
    return 1 if isinstance(value, bool) else 8


def record_bytes(record: ArrayRecord | MetricRecord | ConfigRecord) -> int:
    """Bytes of a record as Flower counts them (``count_bytes``), also for empty strings and lists.

    Flower 1.41's ``ConfigRecord.count_bytes`` raises on ``""`` and on an empty list.
    """
    if isinstance(record, ArrayRecord):
        return int(record.count_bytes())
    return sum(_value_bytes(value) + len(key) for key, value in record.items())


def describe_reply(reply: Message) -> tuple[RecordSummary, ...]:
    """Every record of a reply: key, kind, array shapes or entry types, bytes — never a value."""
    if not reply.has_content():
        return ()
    out = []
    for key, record in reply.content.items():
        if isinstance(record, ArrayRecord):
            kind, entries = "arrays", {name: list(array.shape) for name, array in record.items()}
        elif isinstance(record, MetricRecord):
            kind, entries = "metrics", {name: type(value).__name__ for name, value in record.items()}
        elif isinstance(record, ConfigRecord):
            kind, entries = "config", {name: type(value).__name__ for name, value in record.items()}
        else:  # pragma: no cover - Flower has no other record kind
            kind, entries = type(record).__name__, {}
        out.append(RecordSummary(key=key, kind=kind, entries=entries, nbytes=record_bytes(record)))
    return tuple(out)


def error_reply(msg: Message, reason: str) -> Message:
    """The error reply Flower would build from an exception, with a reason the centre may read."""
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


def make_outbound_mod(policy_for: Callable[[Context], SitePolicy]) -> Mod:
    """The outermost mod: audit each reply in ``policy_for(context).state_dir`` and scrub each error."""

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        phase = message_phase(msg, context)
        try:
            audit = AuditLog(policy_for(context).state_dir)
        except Exception as exc:  # no policy, no audit folder: the site answers nothing but why
            log.error("%s (%s) not answered: %s", msg.metadata.message_type, phase, _detail(exc))
            return error_reply(msg, public_reason(exc))

        def entry(decision: str, reply: Message | None = None) -> AuditEntry:
            secure = reply is not None and reply.has_content() and RECORD_KEY_CONFIGS in reply.content.config_records
            return AuditEntry(run=int(context.run_id), node=int(context.node_id), message_type=msg.metadata.message_type,
                              phase=phase, secure=secure, decision=decision,
                              records=describe_reply(reply) if reply is not None else ())

        try:
            reply = call_next(msg, context)
            if reply.has_error():  # a mod answered an error itself: its reason is not ours to forward
                raise CldlrError(f"error reply from within the ClientApp: {reply.error.reason}")
        except Exception as exc:
            public = public_reason(exc)
            if isinstance(exc, PolicyRefusal):
                log.warning("%s (%s) refused: %s — %s", msg.metadata.message_type, phase, exc.public, exc.detail)
            else:
                log.error("%s (%s) failed; the centre is told only %r", msg.metadata.message_type, phase, public,
                          exc_info=exc)
            try:
                audit.write(entry(f"refused: {public} ({_detail(exc)})"))
            except Exception as failure:  # noqa: BLE001 - the refusal goes out either way; it carries nothing
                log.error("cannot write the audit log %s: %s", audit.path, failure)
            return error_reply(msg, public)
        try:
            audit.write(entry("sent", reply))
        except Exception as failure:  # noqa: BLE001 - unaudited, nothing leaves
            log.error("cannot write the audit log %s (%s): the reply to %s is not sent", audit.path, failure,
                      msg.metadata.message_type)
            return error_reply(msg, "the site could not write its audit log, so it sends nothing")
        return reply

    return mod


__all__ = ["PublicError", "describe_reply", "error_reply", "make_outbound_mod", "message_phase", "public_reason",
           "record_bytes"]
