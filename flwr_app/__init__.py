"""Flower component references shipped in the FAB; the code they name is the installed cldlr."""
