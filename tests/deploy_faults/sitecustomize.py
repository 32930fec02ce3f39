"""TEST-ONLY fault injection for tests/test_deployment.py; never on a production PYTHONPATH.

The test puts this folder on ``PYTHONPATH`` of chosen SuperNodes; Python imports it at start-up
of the SuperNode and of every ``flwr-clientapp`` process that SuperNode spawns (they inherit its
environment), so the real FAB and the real cldlr code run, with one twist per variable:

``CLDLR_TEST_HEARTBEAT_S``  SuperNode heartbeat interval (Flower: 30 s, so a crashed node is
                            noticed only after up to 60 s; Flower's minimum is 10 s).
``CLDLR_TEST_FAULT``        ``nan@R`` / ``shape@R``: in global round R the site's training reply
                            carries NaN weights / a wrongly shaped first array.
"""

import os
import sys

_PROGRAM = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""

if _PROGRAM == "flower-supernode" and os.environ.get("CLDLR_TEST_HEARTBEAT_S"):
    import flwr.supernode.fleet_http_connection as _connection

    _connection.HEARTBEAT_DEFAULT_INTERVAL = float(os.environ["CLDLR_TEST_HEARTBEAT_S"])

if _PROGRAM == "flwr-clientapp" and os.environ.get("CLDLR_TEST_FAULT"):
    import numpy as _np

    from cldlr.client.federated import FederatedSite as _Site

    _KIND, _ROUND = os.environ["CLDLR_TEST_FAULT"].split("@")
    _real_train_round = _Site.train_round

    def _faulty_train_round(self, global_arrays, *, server_round, proximal_mu=0.0):  # type: ignore[no-untyped-def]
        arrays, n, metrics = _real_train_round(self, global_arrays, server_round=server_round, proximal_mu=proximal_mu)
        if server_round == int(_ROUND):
            name = next(iter(arrays))
            if _KIND == "nan":
                arrays = {k: _np.full_like(v, _np.nan) if _np.issubdtype(v.dtype, _np.floating) else v
                          for k, v in arrays.items()}
            else:
                arrays = {**arrays, name: _np.zeros(arrays[name].size + 1, dtype=arrays[name].dtype)}
            print(f"CLDLR TEST FAULT: round {server_round} reply corrupted ({_KIND})", file=sys.stderr, flush=True)
        return arrays, n, metrics

    _Site.train_round = _faulty_train_round
