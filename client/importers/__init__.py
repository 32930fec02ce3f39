"""Importers that turn public or in-house layouts into the cldlr site contract."""
