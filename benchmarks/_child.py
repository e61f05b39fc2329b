"""Measurements in a fresh Python process, so peak-memory figures do not leak between them.

A benchmark script calls itself with ``--child '<json list>'``: `add_child_options` declares
that option and ``--threads``, `answer_as_child` runs the measurement in the child and prints
its JSON result, and `measure_in_child` starts the child from the parent and reads the result
back (the last line of its output that starts with ``{``), or says why there is none.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any


def add_child_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)


def answer_as_child(args: argparse.Namespace, run_one: Callable[..., dict]) -> bool:
    """Sets ``--threads``; in a child (``--child``) prints ``run_one(*config)`` as JSON and
    returns True, so the script's ``main`` returns at once."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if not args.child:
        return False
    print(json.dumps(run_one(*json.loads(args.child))))
    return True


def measure_in_child(script: str, config: list[Any], threads: int, timeout: float, tail: int = 160) -> dict:
    """``run_one(*config)`` of ``script`` in a fresh process: its result with ``status`` "ok" (a
    result's own ``status`` wins), or ``status`` "timeout (N s)" or "failed: <its last output line>"."""
    cmd = [sys.executable, script, "--child", json.dumps(config), "--threads", str(threads)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout ({timeout:.0f} s)"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"status": f"failed: {last[0][:tail]}"}
    return {"status": "ok", **json.loads(lines[-1])}
