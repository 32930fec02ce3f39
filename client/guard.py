"""The site's checks of every secure round, at the SecAgg+ stage where each must happen.

The centre chooses a SecAgg+ round's group: how many sites it samples, how many of them get a
share of this site's mask and how many shares unmask it. A centre that also registers SuperNodes
of its own could run a "secure" sum over one real site, or the same sum twice over different
groups and subtract. :class:`SecureRoundGuard` answers for the site:

- **setup** — ``sample_num``, ``share_num`` and ``threshold`` against the policy
  (:func:`~cldlr.client.policy.check_secagg_group`), *before* Flower's mod runs: the site sends
  nothing to a bad group, not even its public keys;
- **share keys** — the neighbours the centre lists (this site included) against the policy's
  minimum; their node ids are kept as the round's contributor set;
- **collect masked vectors** — the task must be one of the protocol's
  (:data:`~cldlr.common.secure.tasks.SECURE_SUM_TASKS`), and the release must not have gone to
  another contributor set before (:class:`~cldlr.client.releases.ReleaseLedger`);
- **unmask** — the sites whose vectors the centre will add up (its active list) must be enough,
  none of them also called dropped, and the release must not have been unmasked over another set;
  a sum whose noise share assumed more honest sites than are left is not unmasked either.

With whole-study DP the guard also hands each freshly computed vector to the site's
:class:`~cldlr.client.sum_noise.SumNoiser` (:meth:`SecureRoundGuard.noise`), with the round's
neighbours and the clipping and quantisation ranges of its setup stage.

What a task computes is checked where it is computed (class counts and histogram bins, in
:class:`~cldlr.client.federated.FederatedSite`); a vector's length and bounds in
:mod:`cldlr.client.secure_sum`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context
from flwr.common.secure_aggregation.secaggplus_constants import Key

from cldlr.client.policy import PolicyRefusal, SitePolicy, check_neighbours, check_secagg_group
from cldlr.client.releases import ReleaseLedger, release_names
from cldlr.client.sum_noise import SumNoiser
from cldlr.common.secure.sums import SecureSumSpec
from cldlr.common.secure.tasks import BATCH_TASK, SECURE_SUM_TASKS

NEIGHBOURS_KEY = "cldlr.secagg.neighbours"  # context.state: the node ids of this round's share-keys stage
RELEASE_KEY = "cldlr.secagg.release"  # context.state: the names of what this round's masked vector releases
RANGES_KEY = "cldlr.secagg.ranges"  # context.state: this round's clipping and quantisation ranges (setup stage)
NOISE_KEY = "cldlr.secagg.noise"  # context.state: the honest sites the noise of this call's vector assumes


def _integer(configs: ConfigRecord, key: str) -> int:
    value = configs.get(key)
    if type(value) is not int:  # bool is an int too; Flower's own check wants exactly int
        raise PolicyRefusal("malformed secure-round setup", f"{key}={value!r} is not an integer")
    return value


def release_units(spec: SecureSumSpec, vector: np.ndarray) -> list[tuple[str, Mapping[str, Any], np.ndarray]]:
    """(task, payload, answer) of each independent sum in a request: the parts of a batch, or the task itself."""
    if spec.task != BATCH_TASK:
        return [(spec.task, spec.payload, vector)]
    units, start = [], 0
    for part in spec.payload.get("parts", []):
        length = int(part.get("length", 0))
        units.append((str(part.get("task")), dict(part.get("payload") or {}), vector[start : start + length]))
        start += length
    return units


def check_task_names(spec: SecureSumSpec) -> None:
    """Refuse a request outside the protocol's task list (a batch's parts included)."""
    names = [spec.task]
    if spec.task == BATCH_TASK:
        parts = spec.payload.get("parts")
        names = [str(p.get("task")) if isinstance(p, Mapping) else repr(p) for p in parts] if isinstance(parts, list) else ["?"]
        if BATCH_TASK in names:
            raise PolicyRefusal("a secure-sum task outside the protocol", "a batch inside a batch")
    unknown = [n for n in names if n not in SECURE_SUM_TASKS]
    if unknown:
        raise PolicyRefusal("a secure-sum task outside the protocol",
                            f"task(s) {unknown}; the protocol has {', '.join(SECURE_SUM_TASKS)}")


class SecureRoundGuard:
    """Policy checks at the SecAgg+ setup, share-keys, collect and unmask stages of one site (see the module)."""

    def __init__(self, policy_for: Callable[[Context], SitePolicy],
                 noiser_for: Callable[[Context], SumNoiser | None] | None = None) -> None:
        self.policy_for = policy_for
        self.noiser_for = noiser_for  # None, or a noiser returning None: the study adds no noise

    def setup(self, configs: ConfigRecord, context: Context) -> None:
        """Refuse a group too small, with too few shares or too low a threshold, before any key is made."""
        for key in (NEIGHBOURS_KEY, RELEASE_KEY, RANGES_KEY):  # a new round: no contributors, nothing released yet
            context.state.config_records.pop(key, None)
        check_secagg_group(self.policy_for(context), sample_num=_integer(configs, Key.SAMPLE_NUMBER),
                           share_num=_integer(configs, Key.SHARE_NUMBER), threshold=_integer(configs, Key.THRESHOLD))
        clipping = configs.get(Key.CLIPPING_RANGE)
        context.state.config_records[RANGES_KEY] = ConfigRecord({
            "clipping": float(clipping) if isinstance(clipping, (int, float)) else 0.0,
            "quantization": _integer(configs, Key.TARGET_RANGE) if Key.TARGET_RANGE in configs else 0})

    def noise(self, spec: SecureSumSpec, scaled: np.ndarray, context: Context) -> np.ndarray:
        """The site's noise share on a freshly computed vector (unchanged without whole-study DP)."""
        noiser = self.noiser_for(context) if self.noiser_for is not None else None
        if noiser is None:
            context.state.config_records.pop(NOISE_KEY, None)
            return scaled
        ranges = context.state.config_records.get(RANGES_KEY)
        if ranges is None:
            raise PolicyRefusal("a masked vector asked for outside a complete secure round",
                                "no setup stage of this round was seen at this site")
        neighbours = len(_contributors(context))
        noisy, releases = noiser.noisy(spec, scaled, neighbours=neighbours, clipping_range=float(ranges["clipping"]),
                                       quantization_range=int(ranges["quantization"]))  # type: ignore[call-overload]
        context.state.config_records[NOISE_KEY] = ConfigRecord({"sites": releases[0].sites if releases else 0,
                                                                "call-id": spec.call_id})
        return noisy

    def share_keys(self, configs: ConfigRecord, context: Context) -> None:
        """Refuse too few neighbours; remember who they are (the round's contributor set)."""
        try:
            nodes = sorted(int(node) for node in configs if node != Key.STAGE)
        except ValueError as exc:
            raise PolicyRefusal("malformed secure-round key exchange", f"a neighbour is not a node id ({exc})") from None
        check_neighbours(self.policy_for(context), len(nodes))
        context.state.config_records[NEIGHBOURS_KEY] = ConfigRecord({"nodes": nodes})

    def check_request(self, spec: SecureSumSpec, context: Context) -> None:
        """Before anything is computed: a task of the protocol, inside a round whose keys this site exchanged."""
        check_task_names(spec)
        _contributors(context)

    def release_names(self, spec: SecureSumSpec, vector: np.ndarray) -> list[str]:
        """The names of what this request releases (by request and by answer, per part of a batch)."""
        return [name for task, payload, answer in release_units(spec, vector) for name in release_names(task, payload, answer)]

    def claim(self, names: list[str], context: Context) -> None:
        """Just before a slice is sent: refuse a release that went to another contributor set before."""
        self._ledger(context).claim(run=int(context.run_id), node=int(context.node_id), names=names,
                                    contributors=_contributors(context))
        context.state.config_records[RELEASE_KEY] = ConfigRecord({"names": names})

    def unmask(self, configs: ConfigRecord, context: Context) -> None:
        """Before this site's shares unmask a sum: the sum must cover enough sites, and no other set before.

        The centre's active list names the sites whose masked vectors it will add up; it must not
        also call one of them dead (its mask shares would unmask that site's vector alone).
        """
        active = [int(n) for n in configs.get(Key.ACTIVE_NODE_ID_LIST, [])]  # type: ignore[union-attr]
        dead = [int(n) for n in configs.get(Key.DEAD_NODE_ID_LIST, [])]  # type: ignore[union-attr]
        if set(active) & set(dead):
            raise PolicyRefusal("a site both active and dropped in one secure round",
                                f"nodes {sorted(set(active) & set(dead))} are in both lists")
        check_neighbours(self.policy_for(context), len(active))
        noisy = context.state.config_records.get(NOISE_KEY)
        if noisy is not None and len(active) < int(noisy["sites"]):  # type: ignore[call-overload]
            raise PolicyRefusal("too few sites left for the noise this sum carries",
                                f"{len(active)} active sites < the {noisy['sites']} the site's noise share assumed "
                                "(dp.noise_split=listed); the next round over fewer sites adds a larger share")
        saved = context.state.config_records.get(RELEASE_KEY)
        names = [f"summed:{name}" for name in (saved["names"] if saved is not None else [])]  # type: ignore[union-attr]
        self._ledger(context).claim(run=int(context.run_id), node=int(context.node_id), names=names, contributors=active)

    def _ledger(self, context: Context) -> ReleaseLedger:
        return ReleaseLedger(self.policy_for(context).state_dir)


def _contributors(context: Context) -> list[int]:
    saved = context.state.config_records.get(NEIGHBOURS_KEY)
    if saved is None:
        raise PolicyRefusal("a masked vector asked for outside a complete secure round",
                            "no share-keys stage of this round was seen at this site")
    return [int(n) for n in saved["nodes"]]  # type: ignore[union-attr]


__all__ = ["NEIGHBOURS_KEY", "NOISE_KEY", "RANGES_KEY", "RELEASE_KEY", "SecureRoundGuard", "check_task_names", "release_units"]
