"""The Hugging Face hub when there is no network: fail in a second, not after a minute of retries.

`huggingface_hub` retries an unreachable host with back-off (five retries, ~30 s per file, several files per
model or dataset). Before tunelab asks the hub for anything, `go_offline_if_unreachable` opens one TCP connection
to the hub with a short timeout; when that fails, the hub libraries are switched to offline mode (what
``HF_HUB_OFFLINE=1`` does), so a model or dataset already in the local cache still loads and anything else fails
at once — with the reason (`OFFLINE_NOTE`) added to tunelab's one-line error.
"""

from __future__ import annotations

import functools
import os
import socket
import sys
from urllib.parse import urlparse

OFFLINE_NOTE = "huggingface.co is unreachable, so only the local cache was searched"


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 2.0) -> bool:
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((host.hostname or "huggingface.co", host.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE") or \
        os.environ.get("TRANSFORMERS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


_switched = False  # offline mode set by tunelab (not by the user)


def go_offline_if_unreachable() -> str:
    """Switch the hub libraries offline when the hub cannot be reached; returns the note to add to a loading
    error ('' when the hub is reachable or the user chose offline mode)."""
    global _switched
    if offline() and not _switched:
        return ""
    if _switched or not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        # libraries imported already read the variable at import time: set their copies too
        for module, names in (("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
                              ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))):
            if module in sys.modules:
                for name in names:
                    setattr(sys.modules[module], name, True)
        _switched = True
        return OFFLINE_NOTE
    return ""
