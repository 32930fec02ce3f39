"""Every ``__all__`` names only what its module defines: ``from module import *`` must not fail."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import cldlr.client
import cldlr.common
import cldlr.server
import cldlr.simulations

MODULES = sorted(info.name for package in (cldlr.common, cldlr.server, cldlr.client, cldlr.simulations)
                 for info in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}."))


@pytest.mark.parametrize("name", MODULES)
def test_all_names_exist(name: str) -> None:
    module = importlib.import_module(name)
    missing = [n for n in getattr(module, "__all__", ()) if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names {missing}, which the module does not define"
