"""SIGHUP while `serve` starts: remembered, and reloaded once the reload handler is in; never the default
action, which ends the process.

The reload handler needs the event loop and the first generation (proxy/app/reload.py), which come only after
the slow part of the start: the imports (aiohttp alone is a few hundred milliseconds), the config, the live
catalogue check against every provider, the store's connection, the embedded simulator. A SIGHUP in that
window (a config tool that signals every proxy it just wrote a file for, a `kill -HUP` on a process that is
still starting, a worker the supervisor signals as it starts) ended the process. `hold()` is the first thing a
`serve` process does (proxy/app/entry.py), before those imports; it only sets a flag, and whoever installs the
real handler asks `take()` whether one came: the proxy then reloads (the file may have changed after it was
read), the supervisor has nothing to forward (its workers read the file when they start).

Only this module's `signal` import runs before `hold()`: it must stay light.
"""

from __future__ import annotations

import signal

_pending = False


def _remember(signum, frame) -> None:
    global _pending
    _pending = True


def hold() -> None:
    """From now on a SIGHUP is remembered, not fatal, until an event loop's handler takes its place."""
    sighup = getattr(signal, "SIGHUP", None)
    if sighup is not None:
        signal.signal(sighup, _remember)


def ignore() -> None:
    """At the exit, once nothing will reload: a SIGHUP is ignored. The interpreter's end resets every signal with
    a Python handler (`hold`'s included) to its default action, which for SIGHUP is death: a SIGHUP in that
    last stretch made the exit code 129 instead of the drain's 0. SIG_IGN is the one handler it leaves."""
    sighup = getattr(signal, "SIGHUP", None)
    if sighup is not None:
        signal.signal(sighup, signal.SIG_IGN)


def take() -> bool:
    """Whether a SIGHUP came since `hold()` (or the last `take()`); forgets it."""
    global _pending
    pending, _pending = _pending, False
    return pending


def install(loop, handler) -> object | None:
    """`handler` on SIGHUP through `loop`; returns what was installed before, for `restore`, or None where the
    loop takes no signals (not the main thread, not Unix)."""
    sighup = getattr(signal, "SIGHUP", None)
    if sighup is None:
        return None
    try:
        previous = signal.getsignal(sighup)
        loop.add_signal_handler(sighup, handler)
    except (NotImplementedError, RuntimeError, ValueError):
        return None
    return previous if previous is not None else signal.SIG_DFL


def restore(loop, previous) -> None:
    """The loop's SIGHUP handler removed and `previous` back: removing alone would leave the default action,
    and a SIGHUP during the rest of the shutdown (spans still to flush) would end the process.

    `previous` goes in first: `loop.remove_signal_handler` sets the default action before it returns, and a
    SIGHUP between that and putting `previous` back (the GIL may go to another thread there, for 5 ms) ended a
    worker in a storm of them. The loop's table of handlers is then told it has none for SIGHUP."""
    signal.signal(signal.SIGHUP, previous)
    handlers = getattr(loop, "_signal_handlers", None)
    if not isinstance(handlers, dict):  # another loop: its own removal, then `previous` again
        loop.remove_signal_handler(signal.SIGHUP)
        signal.signal(signal.SIGHUP, previous)
        return
    handlers.pop(signal.SIGHUP, None)
    if not handlers:  # as remove_signal_handler does for the last one: no more writes to the loop's wake-up pipe
        signal.set_wakeup_fd(-1)
