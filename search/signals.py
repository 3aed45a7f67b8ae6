"""How `iterhead train` and `iterhead search` stop on SIGTERM (a batch scheduler's stop, `kill`).

Python's default for SIGTERM ends the process at once: no `finally`, so a training's runs stay
RUNNING until `iterhead reconcile`, and a search's driver dies without Tune's last state save.
Here SIGTERM stops them as Ctrl-C does: a training's runs end KILLED; a search stops the way
Tune stops on Ctrl-C (trials stopped, the experiment state saved, runs KILLED, the
``--resume`` hint printed). Either command then exits 143 (128 + SIGTERM).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the work is, so every `except KeyboardInterrupt` cleanup runs."""


@contextlib.contextmanager
def sigterm_as_ctrl_c() -> Iterator[threading.Event]:
    """Within the block, SIGTERM does what Ctrl-C does at that moment: a graceful stop where a
    SIGINT handler is installed (Tune's, during a search), else `Terminated`. The event says
    whether one came; a SIGTERM after the first does nothing. Must be entered after `ray.init`,
    whose own SIGTERM handler it replaces."""
    seen = threading.Event()

    def stop(signum: int, frame: Any) -> None:
        if seen.is_set():  # the stop is under way: a second signal (a scheduler's repeat) would cut its cleanup
            return
        seen.set()
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler) and handler is not signal.default_int_handler:
            handler(signal.SIGINT, frame)
        else:
            raise Terminated()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGTERM, previous)
