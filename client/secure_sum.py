"""Site side of a secure sum: the SecAgg+ mod and the legacy FitRes reply it expects.

A site hands :func:`make_secure_sum_mod` its tasks: a mapping from task name (the names are in
:mod:`cldlr.common.secure.tasks`) to a callback that turns the centre's payload into a float
vector. The mod runs Flower's ``secaggplus_mod`` only on SecAgg+ messages (everything else passes
through untouched) and, in the protocol's "collect masked vectors" stage, answers from those
tasks itself, so the app's own ``@app.train()`` handler never sees secure-sum rounds. The vector
leaves the site only masked: the reply's ArrayRecord is emptied by ``secaggplus_mod``; the
plaintext parts carry just bookkeeping.

With a :class:`RoundGuard` (the real ClientApp passes :class:`~cldlr.client.guard.SecureRoundGuard`)
the site checks each SecAgg+ stage *before* Flower's mod answers it: the group at setup, the
neighbours at share-keys, the task and the release ledger at collect, the summed set at unmask.
A vector the site cannot send as asked (wrong length, a value that is not finite or exceeds its
bound) raises :class:`SecureSumValueError`, whose public text names the kind of problem and no value.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from cldlr.client.outbound import PublicError
from cldlr.common.secure.sums import SPEC_KEY, ScalePlan, SecureSumError, SecureSumSpec

logger = logging.getLogger(__name__)

TaskFn = Callable[[Mapping[str, Any], Context], "np.ndarray | Sequence[float]"]
"""``fn(payload, context) -> vector``: the site's contribution to one secure-sum task."""

FITINS_CONFIG = "fitins.config"  # where Flower's legacy layout puts a FitIns config (and so the spec)
# RecordDict's typed views share ONE key space: an ArrayRecord and a ConfigRecord need distinct keys.
_CACHE_VECTOR = "cldlr.secure-sum.cache.vector"
_CACHE_META = "cldlr.secure-sum.cache.meta"


class SecureSumValueError(PublicError, SecureSumError):
    """The site's vector cannot be sent as the centre asked; ``public`` says why without a value."""


class RoundGuard(Protocol):
    """The site's checks at each SecAgg+ stage (see :class:`cldlr.client.guard.SecureRoundGuard`)."""

    def setup(self, configs: ConfigRecord, context: Context) -> None:
        """Check the round's group before any key is generated."""

    def share_keys(self, configs: ConfigRecord, context: Context) -> None:
        """Check (and remember) the round's neighbours before any share is sent."""

    def check_request(self, spec: SecureSumSpec, context: Context) -> None:
        """Check a secure-sum request before anything is computed."""

    def release_names(self, spec: SecureSumSpec, vector: np.ndarray) -> list[str]:
        """Name what the request releases."""

    def claim(self, names: list[str], context: Context) -> None:
        """Record (or refuse) the release over this round's contributors, just before a slice is sent."""

    def noise(self, spec: SecureSumSpec, scaled: np.ndarray, context: Context) -> np.ndarray:
        """The site's DP noise share on a freshly computed scaled vector (or the vector itself)."""

    def unmask(self, configs: ConfigRecord, context: Context) -> None:
        """Check the summed set before this site's shares unmask it."""


def scaled_or_refused(plan: ScalePlan, vector: np.ndarray, what: str) -> np.ndarray:
    """``plan.scale(vector)``; a refusal's public text names the kind of problem, its detail the values."""
    try:
        return plan.scale(vector, what=what)
    except SecureSumError as exc:
        values = np.asarray(vector, dtype=np.float64)
        if values.ndim != 1 or values.size != plan.length:
            public = "the site's vector has another length than the centre expects; do both run the same cldlr version?"
        elif not np.all(np.isfinite(values)):
            public = "a value of the site's vector is not finite"
        else:
            public = "a value exceeds its secure-sum bound"
        raise SecureSumValueError(public, str(exc)) from None


def is_secure_sum_request(content: RecordDict) -> bool:
    """True for the legacy FitIns of a secure-sum round (as opposed to SecAgg+ model training)."""
    config = content.config_records.get(FITINS_CONFIG)
    return config is not None and SPEC_KEY in config


def _site_vector(spec: SecureSumSpec, context: Context, tasks: Mapping[str, TaskFn],
                 guard: RoundGuard | None = None) -> np.ndarray:
    """Scaled full vector for this call, computed once and cached in the node's local state.

    With a guard, the release is claimed for every slice (each slice is a SecAgg+ round of its own).
    """
    if guard is not None:
        guard.check_request(spec, context)
    cached = context.state.config_records.get(_CACHE_META)
    if cached is not None and cached.get("call-id") == spec.call_id and _CACHE_VECTOR in context.state.array_records:
        scaled = context.state.array_records[_CACHE_VECTOR]["vector"].numpy()
        names = [str(n) for n in cached.get("releases", [])]  # type: ignore[union-attr]
    else:
        fn = tasks.get(spec.task)
        if fn is None:
            raise SecureSumError(
                f"this site has no secure-sum task '{spec.task}' (it answers: {', '.join(sorted(tasks)) or 'none'}); "
                "do the centre and this site run the same cldlr version?"
            )
        vector = np.asarray(fn(spec.payload, context), dtype=np.float64)
        scaled = scaled_or_refused(spec.plan, vector, f"secure-sum task '{spec.task}'")
        names = guard.release_names(spec, vector) if guard is not None else []
        if guard is not None:  # noise once per call: the slices of a long vector share it (it is cached)
            scaled = guard.noise(spec, scaled, context)
        if not spec.is_last_round:
            context.state.array_records[_CACHE_VECTOR] = ArrayRecord({"vector": Array(np.ascontiguousarray(scaled))})
            context.state.config_records[_CACHE_META] = ConfigRecord({"call-id": spec.call_id, "releases": names})
    if guard is not None:
        guard.claim(names, context)
    return scaled


def build_fitres_content(fitins: RecordDict, context: Context, tasks: Mapping[str, TaskFn],
                         guard: RoundGuard | None = None) -> RecordDict:
    """Legacy FitRes layout with this site's scaled slice, as ``secaggplus_mod`` expects it.

    ``fitres.num_examples`` is 1 so that SecAgg+ weights every site equally; ``fitres.metrics``
    echoes the request id so the centre can reject stale replies. Both travel in plaintext.
    """
    config = fitins.config_records.get(FITINS_CONFIG)
    if config is None or SPEC_KEY not in config:
        raise SecureSumError(f"not a secure-sum request: '{FITINS_CONFIG}' lacks '{SPEC_KEY}'")
    spec = SecureSumSpec.from_json(str(config[SPEC_KEY]))
    vector = _site_vector(spec, context, tasks, guard)
    piece = vector[spec.offset : spec.offset + spec.count]
    if spec.is_last_round:
        context.state.array_records.pop(_CACHE_VECTOR, None)
        context.state.config_records.pop(_CACHE_META, None)
    logger.debug("secure-sum '%s': sending slice [%d, %d) masked", spec.task, spec.offset, spec.offset + spec.count)
    return RecordDict(
        {
            "fitres.parameters": ArrayRecord([piece]),
            "fitres.num_examples": MetricRecord({"num_examples": 1}),
            "fitres.metrics": ConfigRecord(spec.reply_tag()),
            "fitres.status": ConfigRecord({"code": 0, "message": "secure-sum slice ready"}),
        }
    )


def secure_sum_reply(msg: Message, context: Context, tasks: Mapping[str, TaskFn],
                     guard: RoundGuard | None = None) -> Message:
    """Reply to a secure-sum FitIns with the site's slice (to be masked by ``secaggplus_mod``)."""
    return Message(build_fitres_content(msg.content, context, tasks, guard), reply_to=msg)


def make_secure_sum_mod(tasks: Mapping[str, TaskFn], guard: RoundGuard | None = None) -> Mod:
    """Mod running SecAgg+ on SecAgg+ messages only, answering secure sums from ``tasks``: ``ClientApp(mods=[...])``.

    ``guard`` checks each stage before ``secaggplus_mod`` sees it (a refusal sends nothing of that stage).
    """

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content.config_records:
            return call_next(msg, context)
        if guard is not None:
            configs = msg.content.config_records[RECORD_KEY_CONFIGS]
            check = {Stage.SETUP: guard.setup, Stage.SHARE_KEYS: guard.share_keys, Stage.UNMASK: guard.unmask}
            stage_check = check.get(str(configs.get(Key.STAGE, "")))
            if stage_check is not None:
                stage_check(configs, context)

        def answer(inner: Message, ctx: Context) -> Message:
            if is_secure_sum_request(inner.content):
                return secure_sum_reply(inner, ctx, tasks, guard)
            return call_next(inner, ctx)  # SecAgg+ over something else (e.g. legacy model training)

        return secaggplus_mod(msg, context, answer)

    return mod
