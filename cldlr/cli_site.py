"""``cldlr privacy`` and ``cldlr audit``: what a site's own state folder says it spent and sent.

A hospital's privacy officer reads the site's files, not the centre's ledger: the lifetime ε
ledger (``privacy-ledger.json``) and the audit log (``audit.jsonl``) in the folder its policy names
(``folders.state``). Both commands only read.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cldlr.common.errors import CldlrError

from .cli_args import Add


def _state_dir(path: Path) -> Path:
    if not path.is_dir():
        raise CldlrError(f"{path}: no such folder; pass the site's state folder (folders.state of its policy)")
    return path


def cmd_privacy(args: argparse.Namespace) -> int:
    """Print the lifetime ledger, at ``--delta``, else the policy's δ, else the δ its runs were stated at."""
    from cldlr.client.privacy_ledger import describe_ledger

    delta = args.delta
    if delta is None and args.policy is not None:
        from cldlr.client.policy import load_policy

        delta = load_policy(args.policy).dp.delta
    print(describe_ledger(_state_dir(args.state_dir), delta))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """Print, per run, what left the site (messages and bytes, masked or plaintext) and what it refused."""
    from cldlr.client.audit import summarize_audit

    print(summarize_audit(_state_dir(args.state_dir)))
    return 0


def add_site_commands(sub: Any, add: Add) -> None:
    """Register ``privacy`` and ``audit``."""
    p = add("privacy", cmd_privacy, "a site's lifetime ε per dataset and run (its own ledger, composed across runs)")
    p.add_argument("state_dir", type=Path, metavar="STATE_DIR", help="the site's state folder (policy folders.state)")
    delta = p.add_mutually_exclusive_group()
    delta.add_argument("--delta", type=float, help="state ε at this δ (default: the δ the runs were recorded at)")
    delta.add_argument("--policy", type=Path, metavar="FILE", help="state ε at this site policy's dp.delta")

    p = add("audit", cmd_audit, "what left the site per run, from its own audit log (audit.jsonl)")
    p.add_argument("state_dir", type=Path, metavar="STATE_DIR", help="the site's state folder (policy folders.state)")
