"""Shared code of sites and centre: data contract, ROI, models, statistics, config."""
