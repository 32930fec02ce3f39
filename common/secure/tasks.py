"""Every message and secure-sum task name of the study protocol, in one Flower-free place.

The centre sends these names and the sites dispatch on them, so both sides import them from here.
Flower requires the action after ``query.`` to be a Python identifier.
"""

from __future__ import annotations

HANDSHAKE = "query.handshake"
FINALIZE = "query.finalize"
LOCAL_METRICS = "query.local_metrics"
PLAIN_SUM = "query.sum"  # one-site federations only (nothing to hide a sum of one among)
BATCH_TASK = "batch"  # secure-sum task: several independent sums in one SecAgg+ round
