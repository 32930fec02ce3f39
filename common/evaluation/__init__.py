"""Evaluation: how a study is scored and reported, the same for every study shape.

``metrics`` (AUC with DeLong CI, paired DeLong test, threshold metrics) and ``secure_metrics``
(the same from summed histograms and placements) with ``layout`` (the evaluation vectors' order);
``outcome`` (:class:`StudyOutcome`, the model names, ``evaluate_predictions``) is what a study
hands over; ``report`` writes it as ``report.json``/``report.md`` and ``figures`` draws its plots.
``mrmc`` (with ``mrmc_fom``) is the reader study's multi-reader multi-case analysis (OR-Hillis).
"""
