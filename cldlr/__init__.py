"""cldlr: federated CLDLR for BI-RADS 4 breast ultrasound.

The code lives in the top-level folders ``common/``, ``client/``, ``server/`` and
``simulations/``, installed as ``cldlr.common``, ``cldlr.client`` and so on.
"""

__version__ = "0.1.0"
