"""Stopping a training run cleanly on SIGINT (Ctrl-C) and SIGTERM (what schedulers send first).

While training, the first signal only sets a flag: the trainer finishes the step it is in,
writes a checkpoint and raises `RunInterrupted`, which the CLI reports in one line and turns
into exit status 128 + signal (130 for SIGINT, 143 for SIGTERM, as a shell reports a process
the signal ended). A second signal stops at once, without a new checkpoint (`AbortedBySignal`):
the run then resumes from the previous one, as after a crash. The handlers are installed for
the duration of training only, and the previous ones are put back afterwards.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType, TracebackType

from flowkit.errors import FlowkitError

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def resume_command(run_dir: Path) -> str:
    return f"flowkit run --resume {run_dir}"


class RunInterrupted(FlowkitError):
    """Training stopped on a signal; ``checkpointed`` says whether it wrote a checkpoint first."""

    def __init__(self, signum: int, run_dir: Path, step: int, *, checkpointed: bool) -> None:
        self.signum, self.run_dir, self.step, self.checkpointed = signum, run_dir, step, checkpointed
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        if checkpointed:
            what = f"Stopped by {name} after step {step}, with a checkpoint of it"
        else:
            what = f"Stopped by a second {name} during step {step + 1}, without a checkpoint of it"
        super().__init__(f"{what}; continue with: {resume_command(run_dir)}")


class AbortedBySignal(KeyboardInterrupt):
    """A second signal while the first one's step is finishing. A `KeyboardInterrupt`, so that
    no ``except Exception`` on the way up swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class StopOnSignal:
    """A context manager: ``requested`` becomes the signal number on the first SIGINT or
    SIGTERM; the second raises `AbortedBySignal` where the main thread is.

    Signal handlers can only be installed from the main thread; elsewhere (a run driven from a
    worker thread) this does nothing and the signals keep their usual effect.
    """

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for signum, handler in self._previous.items():
            # None: the previous handler was not installed from Python and cannot be put back.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is None:
            self.requested = signum
            return
        raise AbortedBySignal(signum)
