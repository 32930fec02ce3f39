"""Backbones (registry, offline weights, embeddings), named weight exchange and Grad-CAM."""
