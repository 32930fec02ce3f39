"""What runs at the coordinating centre: aggregation, secure fusion, reporting."""
