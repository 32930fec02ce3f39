"""Secure sums: bounds and scaling into SecAgg+, payloads, task names; ``wire`` is the one Flower import."""
