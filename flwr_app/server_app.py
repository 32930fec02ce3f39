"""The centre's Flower component: the INSTALLED ``cldlr.server.app`` ServerApp, nothing else.

Only this folder travels in the FAB (``fab-include`` in pyproject.toml), so the SuperLink runs the
cldlr release installed beside it and a FAB can never shadow that package. Flower validates the
component by reading this file, so the literal ``app = ...`` assignment must stay.
"""

from cldlr.server.app import app as _app

app = _app
