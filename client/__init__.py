"""What runs inside a hospital: validation, importers, local training and statistics."""
