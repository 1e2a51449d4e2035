"""The one rich console every layer prints to (stderr, so stdout stays clean for `--json` output)."""

from __future__ import annotations

from rich.console import Console

console = Console(stderr=True)
