"""How `iterhead` commands stop on SIGTERM (a batch scheduler's stop, `kill`).

Python's default for SIGTERM ends the process at once: no `finally`, so a training's runs stay
RUNNING until `iterhead reconcile`, a search's driver dies without Tune's last state save, and
a report's temporary folder stays. Here SIGTERM stops every command as Ctrl-C does: a
training's runs end KILLED; a search stops the way Tune stops on Ctrl-C (trials stopped, the
experiment state saved, runs KILLED, the ``--resume`` hint printed). The command then exits
143 (128 + SIGTERM).
"""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the work is, so every `except KeyboardInterrupt` cleanup runs."""


_OPEN: list[threading.Event] = []  # the events of the `sigterm_as_ctrl_c` blocks open now, outermost first
STOP_CODES = (130, 128 + signal.SIGTERM)  # a command's exit status after Ctrl-C, after SIGTERM


@contextlib.contextmanager
def sigterm_as_ctrl_c() -> Iterator[threading.Event]:
    """Within the block, SIGTERM does what Ctrl-C does at that moment: a graceful stop where a
    SIGINT handler is installed (Tune's, during a search), else `Terminated`. The event says
    whether one came; a SIGTERM after the first does nothing, and a KeyboardInterrupt out of the
    block after one is `Terminated`. Blocks nest (a command's, a search's): a stop seen by one is
    seen by every block around it, so a repeat after the inner block ends is still ignored.
    `ray.init` replaces the handler while it runs: wrap it in `through_ray_init`. Off the main
    thread (a caller's worker thread) signals are not ours to handle: the block runs as it is."""
    seen = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # signal.signal would raise
        yield seen
        return

    def stop(signum: int, frame: Any) -> None:
        if seen.is_set():  # the stop is under way: a second signal (a scheduler's repeat) would cut its cleanup
            return
        _mark_stopped(seen)
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler) and handler is not signal.default_int_handler:
            handler(signal.SIGINT, frame)
        else:
            raise Terminated()

    previous = signal.signal(signal.SIGTERM, stop)
    _OPEN.append(seen)
    hook = sys.unraisablehook
    sys.unraisablehook = _interrupt_again(hook)
    try:
        yield seen
    except KeyboardInterrupt as interrupt:  # Tune's stop, or Ray's waits, which pass `Terminated` on as a plain one
        if seen.is_set() and not isinstance(interrupt, Terminated):
            raise Terminated() from None
        raise
    finally:
        sys.unraisablehook = hook
        _OPEN.remove(seen)
        signal.signal(signal.SIGTERM, previous)


INTERRUPT_AGAIN_S = 0.05  # past the hook's return, and soon for a person who pressed Ctrl-C


def _interrupt_again(previous: Any) -> Any:
    """An unraisable hook that raises again a Ctrl-C (or `Terminated`) that landed in a finaliser:
    Python prints a `__del__`'s or a garbage-collector callback's exception as "ignored" and goes
    on, and a Ctrl-C there (seen about 3 s into `iterhead report`) let the command run to its end
    and exit 0. `_thread.interrupt_main` calls the SIGINT handler at the main thread's next
    instruction: the stop a Ctrl-C makes there (Tune's, during a fit). Called from a timer's thread
    a moment later: called at once, the handler ran within this hook, whose exception Python
    ignores too; should it land in a finaliser again, this hook tries again. Where Python handles
    no SIGINT (ignored, as under ``nohup``), it is left as before."""
    def hook(unraisable: Any) -> None:
        handled = callable(signal.getsignal(signal.SIGINT))
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt) and handled:
            again = threading.Timer(INTERRUPT_AGAIN_S, _thread.interrupt_main)
            again.daemon = True
            again.start()
            return
        previous(unraisable)
    return hook


def _mark_stopped(seen: threading.Event) -> None:
    """A stop came: `seen` (a block's event) and every block open around it now say so."""
    for event in (seen, *_OPEN):
        event.set()


def after_stop(code: int) -> int:
    """`code`, the exit status of this process's own command; after a stop (`STOP_CODES`) SIGTERM is
    ignored from here to the process's end, as during the stop. With Python's default back, a
    scheduler's SIGTERM repeated a second after the first killed the process as it exited (while
    Ray's processes stopped, before what a pipe still buffered was written): its summary and its
    `--resume` hint were lost."""
    if code in STOP_CODES and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return code


_BEFORE_TUNE: list[Any] = []  # the SIGINT handler in place as Tune's loop began (`tune_loop`)


@contextlib.contextmanager
def tune_loop() -> Iterator[None]:
    """Around `Tuner.fit`. Tune installs a SIGINT handler of its own (on the main thread, unless
    ``TUNE_DISABLE_SIGINT_HANDLER``), which SIGTERM reaches too (`sigterm_as_ctrl_c`), and on a
    stop puts back the handler it found: `tune_stopped`. After a fit no stop reached, Tune's is
    left in place, which a SIGTERM would call on a search already over: the one found is put back."""
    before = signal.getsignal(signal.SIGINT)
    _BEFORE_TUNE[:] = [before]
    try:
        yield
    finally:
        _BEFORE_TUNE.clear()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, before)


def tune_stopped() -> bool:
    """Within `tune_loop`, whether a stop (Ctrl-C, SIGTERM, Tune's SIGUSR1) reached Tune: its handler
    put back the one it found. Tune stops between two of its steps, so a stop as a trial ends,
    before the next one starts (a search with more samples than run at once, a PBT search
    between generations), or before the first starts, leaves every trial it holds ended, and
    only this tells it from a search that ran to its end. False where Tune installs no handler:
    a Ctrl-C there is a KeyboardInterrupt."""
    return (bool(_BEFORE_TUNE) and threading.current_thread() is threading.main_thread()
            and not int(os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0"))
            and signal.getsignal(signal.SIGINT) is _BEFORE_TUNE[0])


@contextlib.contextmanager
def through_ray_init(seen: threading.Event) -> Iterator[None]:
    """Around `ray.init`, which installs its own SIGTERM handler, ``sys.exit(15)``, for its whole
    start (seconds) and leaves it there. A SIGTERM then ended the command with status 15 and no
    word, and the Ray agents its raylet had started lived on for a minute, waiting for a GCS gone
    with the driver. Here that exit ends the processes this start began, then is `Terminated`;
    the SIGTERM handler found before is put back. (A Ctrl-C there left nothing behind without
    help in `tests/test_stop_signals.py`, so it is not handled here.)"""
    ours = signal.getsignal(signal.SIGTERM)
    before = set(descendants(os.getpid()))
    try:
        yield
    except SystemExit as stop:
        if stop.code != signal.SIGTERM:
            raise
        _mark_stopped(seen)  # first: a repeated SIGTERM, once ours is back, then finds the stop begun
        signal.signal(signal.SIGTERM, ours)  # Ray's sys.exit must not cut what follows
        kill_started(before)
        raise Terminated() from None
    finally:
        signal.signal(signal.SIGTERM, ours)


def descendants(pid: int) -> list[int]:
    """The processes under `pid` (children, theirs, ...), from Linux's /proc; none where it is missing."""
    found: list[int] = []
    todo = [pid]
    while todo:
        for children in Path(f"/proc/{todo.pop()}/task").glob("*/children"):
            try:
                pids = [int(child) for child in children.read_text().split()]
            except OSError:  # the process or thread ended meanwhile
                continue
            found += pids
            todo += pids
    return found


def kill_started(before: set[int]) -> None:
    """SIGKILL the processes under this one that are not in `before`, each stopped first (SIGSTOP)
    until no new one appears: a raylet still starting would otherwise start agents after the count."""
    stopped: list[int] = []
    try:
        while new := [pid for pid in descendants(os.getpid()) if pid not in before and pid not in stopped]:
            for pid in new:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
            stopped += new
    finally:  # never leave one stopped: interrupted here, the ones counted so far still end
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
