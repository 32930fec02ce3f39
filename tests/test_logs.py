"""Entry points log readably: Flower's per-request HTTP lines and duplicate copies are kept out."""

from __future__ import annotations

import logging

from cldlr.common.logs import configure_logging


def test_httpx_requests_are_quiet_and_flower_lines_are_not_repeated(caplog) -> None:
    flwr = logging.getLogger("flwr")
    old = flwr.propagate, logging.getLogger("httpx").level
    try:
        configure_logging(logging.INFO)
        assert logging.getLogger("httpx").getEffectiveLevel() == logging.WARNING
        assert not flwr.propagate
        with caplog.at_level(logging.INFO):
            logging.getLogger("httpx").info("HTTP Request: POST https://127.0.0.1:9092/v1/runtime/pull-messages")
            logging.getLogger("cldlr.centre").info("round 1: averaged")
        assert [r.name for r in caplog.records] == ["cldlr.centre"]
        configure_logging(logging.DEBUG)  # -v keeps httpx at WARNING too: its lines are never the point
        assert logging.getLogger("httpx").getEffectiveLevel() == logging.WARNING
    finally:
        flwr.propagate, _ = old
        logging.getLogger("httpx").setLevel(old[1])
