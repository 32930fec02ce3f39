"""Test-only Flower app: simulated sites securely sum known vectors; every reply they send is recorded.

The same module holds the leak detector (:func:`fingerprints`, :func:`leaks`) that checks those
recordings for a site's vector in binary (float64/float32, any byte offset) or printed form.

Run as ``python tests/secagg_app.py '<settings JSON>'`` (Flower's simulation engine with Ray).
Settings are read from the run config when it has them, else from ``$CLDLR_SECAGG_DEMO``
(``run_simulation`` passes no run config): ``output`` (JSON file the ServerApp writes), ``sites``
(3), ``long-length`` (0 skips the long task), ``record-dir`` (where each site dumps everything it
sends), ``bad-task`` (also run tasks that sites answer with the wrong length),
``max-elements-per-round`` (0 = one round).
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.serverapp import Grid, ServerApp

from cldlr.client.secure_sum import FITINS_CONFIG, make_secure_sum_mod
from cldlr.common.config import SecAggConfig
from cldlr.common.io import atomic_write_bytes, atomic_write_json
from cldlr.common.secure.sums import SecureSumError
from cldlr.server.secure_sum import secure_sum, wait_for_sites

ENV_SETTINGS = "CLDLR_SECAGG_DEMO"
SMALL_BLOCKS = [(2, 500.0), (2, 5000.0), (2, 50.0)]  # counts, sums of squares, signed means
LONG_BOUND = 1000.0


def settings(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """Run config (``flwr run``) or, failing that, the JSON in ``$CLDLR_SECAGG_DEMO`` (run_simulation)."""
    if "output" in run_config:
        return dict(run_config)
    return dict(json.loads(os.environ.get(ENV_SETTINGS, "{}")))


def site_vector(task: str, partition_id: int, payload: Mapping[str, Any], length: int = 0) -> np.ndarray:
    """The known contribution of simulated site ``partition_id`` to ``task``."""
    if task == "small":
        p = partition_id
        shift = float(payload["shift"])
        return np.array([100 + 7 * p, 3 + p, 1234.5 * (p + 1), 4321.0 - 17 * p, -12.25 * (p + 1) + shift, 0.5 * p - shift])
    if task == "long":
        rng = np.random.default_rng(int(payload["seed-base"]) + partition_id)
        return rng.uniform(-LONG_BOUND, LONG_BOUND, size=int(payload["length"]))
    if task == "counts":  # integer counts, e.g. a score histogram
        return np.array([10 * partition_id, partition_id + 1, 250, 999 - partition_id, 0], dtype=np.float64)
    if task == "bad":  # every site but the first answers with one element too many -> protocol halts
        return np.ones(length + (partition_id > 0))
    if task == "one-bad":  # only the third site is wrong -> two survivors, fewer than required
        return np.ones(length + (partition_id == 2))
    raise KeyError(task)


def _task_fn(task: str, length: int = 0) -> Any:
    def fn(payload: Mapping[str, Any], context: Context) -> np.ndarray:
        return site_vector(task, int(context.node_config["partition-id"]), payload, length)

    return fn


def _blobs(msg: Message) -> dict[str, np.ndarray]:
    """Everything a reply carries: raw bytes as uint8 (``text/`` for strings), numbers as float64 arrays."""
    out: dict[str, np.ndarray] = {}
    if not msg.has_content():
        return out
    for rname, record in msg.content.items():
        if isinstance(record, ArrayRecord):
            out[f"count/{rname}"] = np.asarray([float(len(record))])
            for key, arr in record.items():
                out[f"array/{rname}/{key}"] = np.frombuffer(arr.numpy().tobytes(), dtype=np.uint8)
            continue
        assert isinstance(record, (ConfigRecord, MetricRecord))
        for key, value in record.items():
            items = value if isinstance(value, list) else [value]
            numbers = [float(v) for v in items if isinstance(v, (int, float))]
            if numbers:
                out[f"numbers/{rname}/{key}"] = np.asarray(numbers, dtype=np.float64)
            for i, item in enumerate(items):
                if isinstance(item, (bytes, str)):
                    raw = item if isinstance(item, bytes) else item.encode()
                    out[f"{'bytes' if isinstance(item, bytes) else 'text'}/{rname}/{key}/{i}"] = np.frombuffer(raw, np.uint8)
    return out


_MIX = np.uint64(0x9E3779B97F4A7C15)
_DECIMAL = re.compile(rb"-?\d+\.\d+(?:[eE][-+]?\d+)?")


def _words(raw: bytes, shifts: range) -> list[np.ndarray]:
    """``raw`` read as little-endian uint64 words starting at each byte offset in ``shifts``."""
    return [np.frombuffer(raw[k : k + (len(raw) - k) // 8 * 8], dtype="<u8") for k in shifts if len(raw) - k >= 8]


def _window_keys(raw: bytes, step: int) -> np.ndarray:
    """A 64-bit key for every 16-byte window of ``raw`` starting at a multiple of ``step``."""
    keys = [w[:-1] ^ (w[1:] * _MIX) for w in _words(raw, range(0, 8, step)) if w.size >= 2]
    return np.concatenate(keys) if keys else np.zeros(0, dtype=np.uint64)


def _isin_sorted(values: np.ndarray, sorted_ref: np.ndarray) -> bool:
    if not values.size or not sorted_ref.size:
        return False
    pos = np.minimum(np.searchsorted(sorted_ref, values), sorted_ref.size - 1)
    return bool(np.any(sorted_ref[pos] == values))


def fingerprints(*vectors: np.ndarray) -> dict[str, np.ndarray]:
    """What a plaintext copy of ``vectors`` would look like on the wire, at any byte offset.

    ``pairs``: two consecutive float64 / four consecutive float32 elements; ``singles``: one float64
    element whose low mantissa bits are not all zero (round numbers like 3.0 are too common);
    ``values``: all elements, to compare with decimals printed into strings.
    """
    as64 = [np.asarray(v, "<f8") for v in vectors]
    pairs = [_window_keys(v.tobytes(), 8) for v in as64] + [_window_keys(np.asarray(v, "<f4").tobytes(), 4) for v in vectors]
    singles = np.concatenate([v.view("<u8") for v in as64])
    return {
        "pairs": np.unique(np.concatenate(pairs)),
        "singles": np.unique(singles[(singles & np.uint64(0xFFFF)) != 0]),
        "values": np.unique(np.concatenate(as64)),
    }


def leaks(blobs: dict[str, np.ndarray], fp: dict[str, np.ndarray]) -> list[str]:
    """Names of the blobs that carry the fingerprinted vectors in binary or as printed decimals."""
    found = []
    for name, blob in blobs.items():
        raw = blob.tobytes()
        hit = _isin_sorted(_window_keys(raw, 1), fp["pairs"])
        hit = hit or any(_isin_sorted(w, fp["singles"]) for w in _words(raw, range(8)))
        if name.startswith("text/"):
            printed = np.array([float(m) for m in _DECIMAL.findall(raw)])
            if printed.size:
                pos = np.clip(np.searchsorted(fp["values"], printed), 1, fp["values"].size - 1)
                near = np.minimum(np.abs(fp["values"][pos] - printed), np.abs(fp["values"][pos - 1] - printed))
                hit = hit or bool(np.any(near <= 1e-5 * np.maximum(np.abs(printed), 1e-3)))
        if hit:
            found.append(name)
    return found


def recording_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Outermost mod: dump every outgoing reply of this site, exactly as it leaves the ClientApp."""
    reply = call_next(msg, context)
    record_dir = settings(context.run_config).get("record-dir")
    if record_dir:
        buf = io.BytesIO()
        np.savez(buf, **_blobs(reply))
        name = f"site{context.node_config['partition-id']}-node{context.node_id}-{uuid.uuid4().hex}.npz"
        atomic_write_bytes(Path(record_dir) / name, buf.getvalue())
    return reply


BAD_LENGTH = 4
client_app = ClientApp(
    mods=[
        recording_mod,
        make_secure_sum_mod(
            {
                "small": _task_fn("small"), "long": _task_fn("long"), "counts": _task_fn("counts"),
                "bad": _task_fn("bad", BAD_LENGTH), "one-bad": _task_fn("one-bad", BAD_LENGTH),
            }
        ),
    ]
)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Stands in for ordinary Message-API training: secure-sum rounds must never reach it."""
    if FITINS_CONFIG in msg.content.config_records or RECORD_KEY_CONFIGS in msg.content.config_records:
        raise RuntimeError("a SecAgg+ message reached the plain train handler")
    return Message(RecordDict({"echo": MetricRecord({"partition-id": int(context.node_config["partition-id"])})}), reply_to=msg)


@client_app.query()
def query(msg: Message, context: Context) -> Message:
    """An ordinary query: answered directly, the secure-sum mod only passes it on."""
    return Message(RecordDict({"echo": MetricRecord({"partition-id": int(context.node_config["partition-id"])})}), reply_to=msg)


def _plain_round(grid: Grid, message_type: str) -> bool:
    """Send an ordinary message to every site; True if each answered through the mod untouched."""
    nodes = wait_for_sites(grid, 3, 120.0)
    msgs = [Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=n, message_type=message_type) for n in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=120))
    return len(replies) == len(nodes) and all(not r.has_error() and "echo" in r.content.metric_records for r in replies)


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Securely sum the demo tasks one after another and write every result to ``output``."""
    cfg = settings(context.run_config)
    sites = int(cfg.get("sites", 3))
    per_round = int(cfg.get("max-elements-per-round", 0)) or None
    jobs: list[tuple[str, int, Any, dict[str, Any]]] = [("small", 6, SMALL_BLOCKS, {"shift": 0.25}), ("counts", 5, 1000.0, {})]
    if int(cfg.get("long-length", 0)):
        length = int(cfg["long-length"])
        jobs.append(("long", length, LONG_BOUND, {"seed-base": 1000, "length": length}))
    if cfg.get("bad-task"):
        jobs += [("bad", BAD_LENGTH, 10.0, {}), ("one-bad", BAD_LENGTH, 10.0, {})]
    results: dict[str, Any] = {"passthrough": {t: _plain_round(grid, t) for t in ("train", "query")}}
    for task, length, bound, payload in jobs:
        try:
            res = secure_sum(
                grid, context, task=task, length=length, bound=bound, num_sites_expected=sites,
                payload_config=payload, secagg_cfg=SecAggConfig(), timeout=300.0,
                max_elements_per_round=per_round if task == "long" else None, integer=task == "counts",
            )
        except SecureSumError as exc:
            results[task] = {"error": str(exc)}
            continue
        results[task] = {
            "values": res.values.tolist(), "error_bound": res.error_bound.tolist(), "num_sites": res.num_sites,
            "node_ids": list(res.node_ids), "rounds": res.rounds, "elapsed_s": res.elapsed_s, "payload": payload,
        }
    atomic_write_json(cfg["output"], results)


def run(settings_json: str) -> None:
    """Run the demo in Flower's simulation engine (Ray); settings travel to Ray workers via the environment."""
    from flwr.simulation import run_simulation

    os.environ[ENV_SETTINGS] = settings_json
    sites = int(json.loads(settings_json).get("sites", 3))
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=sites,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}},
    )


if __name__ == "__main__":
    # Re-import under the module's own name so Ray pickles the apps by reference, not by value.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from secagg_app import run as _run

    _run(sys.argv[1])
