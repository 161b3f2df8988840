"""The seam through which a policy sees an answer as it passes (the response cache's capture), and the one
thing the pipeline does for it beyond feeding it: reading a stream to its end for requests that wait on it
when its own client has gone.

A tap sits on the request's context (`ctx.tap`, None unless a policy set one). The pipeline calls `body(bytes)`
with a plain answer (status 200) as it goes to the client, and `stream(bytes)` with each piece of whole SSE
events a stream forwards. Whether the answer was whole is the pipeline's judgement (`ctx.answered`), which the
policy reads in its `after()`; only a stream kept for followers reports its own end (`stream_ended`).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Awaitable, Callable, Protocol

from proxy.upstream.http1 import UpstreamError
from proxy.upstream.sse import scan

if TYPE_CHECKING:
    from proxy.pipeline.pipeline import _Opened


class Tap(Protocol):
    answered_by: str

    @property
    def followed(self) -> bool:
        """Requests are waiting on this answer."""
        ...

    def body(self, data: bytes) -> None: ...

    def stream(self, data: bytes) -> None: ...

    def keep(self, rest: Callable[[], Awaitable[None]]) -> None:
        """Runs `rest()` (the rest of the stream, read for the followers) in a task of its own."""
        ...

    def stream_ended(self, whole: bool) -> None: ...


def keep_for_followers(tap: Tap | None, opened: "_Opened") -> bool:
    """The client left mid-stream while identical requests wait on this one: the upstream stream is read to
    its end for them, within the attempt's timeout_s. True when it was (the caller must not release it)."""
    if tap is None or not tap.followed:
        return False
    resp, splitter, state = opened.resp, opened.splitter, opened.state
    deadline = opened.start + opened.provider.total_s

    async def rest() -> None:
        try:
            async with asyncio.timeout_at(deadline):
                while not state.done and state.error is None:
                    complete = await opened.next_events(scan)
                    if not complete or state.malformed:
                        break
                    tap.stream(complete)
        except (TimeoutError, UpstreamError):
            pass
        finally:
            resp.release(drain=state.done)
            whole = state.error is None and not state.malformed and (
                state.done or (bool(state.finish_reasons) and not splitter.tail.strip()))
            tap.answered_by = opened.attempt.target.model
            tap.stream_ended(whole)

    tap.keep(rest)
    return True
