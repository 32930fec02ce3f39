"""Every message and secure-sum task name of the study protocol, in one Flower-free place.

The centre sends these names and the sites dispatch on them, so both sides import them from here.
Flower requires the action after ``query.`` to be a Python identifier.
"""

from __future__ import annotations

HANDSHAKE = "query.handshake"
FINALIZE = "query.finalize"
LOCAL_METRICS = "query.local_metrics"
PLAIN_SUM = "query.sum"  # one-site federations only (nothing to hide a sum of one among)

# Secure-sum tasks: what a site computes for one SecAgg+ sum (see cldlr.server.federated_study).
CLINICAL_STATS = "clinical-stats"  # per-parameter counts, moments and histograms (selection)
ENCODER_SUMS = "encoder-sums"  # what the clinical encoder is fitted from
FUSION_SUMS = "fusion-sums"  # the SVM fusion's sufficient statistics
SCORE_HISTOGRAMS = "score-histograms"  # per-model score histograms (AUC, confusion tables)
PLACEMENT_SUMS = "placement-sums"  # DeLong placements of the pooled evaluation
SCORE_MOMENTS = "score-moments"  # per-bin score sums and Σ score² (calibration, Brier, decision curve)
CALIBRATION_NEWTON = "calibration-newton"  # Σ gradient / Hessian of the calibration intercept/slope fit
BATCH_TASK = "batch"  # several independent sums in one SecAgg+ round
SECURE_SUM_TASKS = (CLINICAL_STATS, ENCODER_SUMS, FUSION_SUMS, SCORE_HISTOGRAMS, PLACEMENT_SUMS, SCORE_MOMENTS,
                    CALIBRATION_NEWTON, BATCH_TASK)
"""Every task a site answers; a site that lacks one cannot take part in the study."""
