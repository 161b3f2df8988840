"""Hedged requests: when the attempt in flight has produced nothing after a delay, the next model starts in
parallel, and the first to produce a data event (a stream) or a whole valid answer (a plain request) wins.

Cheap when it does not fire: the primary attempt runs in the handler's own task, and the only cost is one
`loop.call_later` (about 2 us with uvloop; bench/hedge_cost.py measures the whole). Only when the timer fires is
a task made, for the hedge. If the hedge wins, the primary is interrupted the way `asyncio.timeout` interrupts a
task (a cancel it takes back on the way out); the loser's upstream connection is closed by that cancellation.
Nothing outlives the race: every path out of it, the client's departure and the request's deadline included,
cancels and awaits the hedge task.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, Coroutine


async def race(
    primary: Coroutine[Any, Any, Any],
    hedge: Callable[[], Awaitable[Any] | None],
    delay_s: float,
    lost: Callable[[Any], None],
    discard: Callable[[Any], None],
) -> tuple[Any, bool]:
    """Runs `primary`; after `delay_s` without a result, `hedge()` too (it returns None when there is no model
    left to hedge with). Returns (the first result that is not None, whether the hedge was started); None when
    both failed. `lost(winner)` is called before the loser is cancelled, so its attempts in flight can be marked;
    `discard(result)` closes a loser that finished too."""
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    cancelling = me.cancelling()
    task: asyncio.Task | None = None
    racing = True  # the primary is being awaited: only then may the hedge interrupt it
    interrupted = False

    def hedge_done(t: asyncio.Task) -> None:
        nonlocal interrupted
        if racing and not interrupted and not t.cancelled() and t.exception() is None and t.result() is not None:
            lost(t.result())  # marks the primary's attempt in flight as the loser
            interrupted = True
            me.cancel()

    def fire() -> None:
        nonlocal task
        coro = hedge()
        if coro is not None:
            task = loop.create_task(coro)
            task.add_done_callback(hedge_done)

    timer = loop.call_later(delay_s, fire)
    try:
        try:
            result = await primary
        except asyncio.CancelledError:
            racing = False
            # Taken back only when the cancel was the hedge's alone: a client leaving (or the deadline) in the
            # same moment still ends the request, as asyncio.timeout does it.
            if not interrupted or me.uncancel() > cancelling:
                raise
            return task.result(), True
        racing = False
        timer.cancel()
        if task is None:
            return result, False
        if result is not None:
            if task.done():
                other = None if task.cancelled() or task.exception() is not None else task.result()
                if other is not None:
                    discard(other)
            else:
                lost(result)
                task.cancel()
                await asyncio.wait([task])
            return result, True
        return await task, True  # the primary failed: the hedge goes on alone
    finally:
        racing = False
        timer.cancel()
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])  # never leave an attempt running past its request
