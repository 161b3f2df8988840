"""The task both span exporters run (`otlp.Exporter`, the built-in one, and `sdk.SdkExporter`): it drains the
tracer's queue every `interval_s` on the event loop, off every request's path, and is stopped at close before
the last flush. How spans leave is each exporter's own `flush`."""

from __future__ import annotations

import asyncio


class ExportTask:
    interval_s: float
    _task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def flush(self) -> None:
        raise NotImplementedError

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.flush()

    async def _stop(self) -> None:
        """Ends the periodic task; the caller flushes what is still queued."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
