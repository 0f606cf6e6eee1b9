"""Loader of ``dynamo_ext._native``, the C hot loops (dynamo_ext/_native.c), and the switch
between them and their pure-Python references.

``pip install -e .`` compiles the extension (setup.py, ``optional=True``). Where it is
missing (no compiler at install time, an unusual platform) every caller runs the Python
reference instead: same results, slower; a warning says so once and the router exports
``dynamo_ext_router_native 0``. ``DYNAMO_EXT_NATIVE=0`` forces the fallback, and
``set_enabled`` flips it in-process so that a benchmark or a test compares both in one run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)


def _load() -> ModuleType | None:
    try:
        import dynamo_ext._native as mod
    except ImportError as exc:
        log.warning(
            "dynamo_ext._native is not built (%s): the router runs its pure-Python hot path "
            "(reinstall with a C compiler: pip install -e .)",
            exc,
        )
        return None
    # The engine hash -> router hash map and the index's GPU tier are dicts in all but
    # layout: say so to isinstance.
    MutableMapping.register(mod.U64Map)
    MutableMapping.register(mod.MaskMap)
    return mod


_MODULE = _load()
# The module callers use now: the extension, or None for the Python reference.
IMPL: ModuleType | None = _MODULE if os.environ.get("DYNAMO_EXT_NATIVE", "1") != "0" else None


def available() -> bool:
    """Whether the extension was built and imports."""
    return _MODULE is not None


def enabled() -> bool:
    """Whether the hot loops run native now."""
    return IMPL is not None


def set_enabled(on: bool) -> bool:
    """Use the extension (when available) or the Python reference; returns the old state."""
    global IMPL
    old = IMPL is not None
    IMPL = _MODULE if on else None
    return old


def new_table(name: str) -> MutableMapping[int, int]:
    """An empty int -> int map: the extension's ``name`` (``U64Map``, ``MaskMap``) where the
    hot loops run native, else a dict. Either works with the native and the Python paths."""
    return getattr(IMPL, name)() if IMPL is not None else {}  # type: ignore[no-any-return]


def native_table(m: MutableMapping[int, int], name: str) -> Any:
    """``m`` when it is the extension's ``name`` and the hot loops run native, else None
    (the caller's Python loops, the reference, work on either map)."""
    return m if IMPL is not None and type(m) is getattr(IMPL, name) else None
