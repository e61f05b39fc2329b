"""The one rich Console of the CLI, and error reporting."""

from __future__ import annotations

import os
import sys

from rich.console import Console

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def progress_enabled() -> bool:
    """Progress bars only on a terminal, and never with NO_COLOR set."""
    return console.is_terminal and "NO_COLOR" not in os.environ and "CI" not in os.environ


def traceback_requested() -> bool:
    return os.environ.get("FLOWKIT_DEBUG", "") not in ("", "0") or "--traceback" in sys.argv
