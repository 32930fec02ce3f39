"""Metrics (AUC with DeLong CI, threshold metrics), their secure counterparts, figures and the study report."""
