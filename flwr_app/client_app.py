"""The hospital's Flower component: the INSTALLED ``cldlr.client.app`` ClientApp, nothing else.

Only this folder travels in the FAB (``fab-include`` in pyproject.toml), so every SuperNode runs
the cldlr release installed at its hospital; the handshake then checks that the centre's and the
site's versions agree. Flower validates the component by reading this file (literal ``app = ...``).
"""

from cldlr.client.app import app as _app

app = _app
