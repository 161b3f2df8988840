"""A real headless Chromium for the tests, driven over the DevTools protocol (a websocket, with aiohttp).

`find_browser()` names the system's Chromium or Chrome, or None where none is installed. `Browser` starts it
on a free port with a throw-away profile, opens a page, and evaluates JavaScript in it; `wait_for(condition)`
resolves when a JavaScript condition becomes true, checked on every change of the page's DOM (a
MutationObserver), so a test waits for what the page shows, not for a number of seconds.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import shutil
import tempfile

import aiohttp
import orjson

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
_LISTENING = re.compile(rb"DevTools listening on (ws://\S+)")


def find_browser() -> str | None:
    for name in NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class BrowserError(RuntimeError):
    pass


class Browser:
    def __init__(self, path: str, timeout_s: float = 60.0) -> None:
        self.path = path
        self.timeout_s = timeout_s  # a safety net against a hang, never a measure of speed
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._events: dict[str, asyncio.Future] = {}

    async def __aenter__(self) -> "Browser":
        self._profile = tempfile.mkdtemp(prefix="groq-proxy-chromium-")
        self._proc = await asyncio.create_subprocess_exec(
            self.path, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--remote-debugging-port=0",
            "--remote-debugging-address=127.0.0.1", f"--user-data-dir={self._profile}", "about:blank",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            async with asyncio.timeout(self.timeout_s):
                browser_ws = await self._listening()
            self._drain = asyncio.create_task(self._drain_stderr())  # a full pipe would stall the browser
            port = browser_ws.split("/")[2].rsplit(":", 1)[1]
            self._session = aiohttp.ClientSession()
            async with self._session.get(f"http://127.0.0.1:{port}/json/list") as resp:
                targets = await resp.json()
            page = next(t for t in targets if t["type"] == "page")
            self._ws = await self._session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
            self._reader = asyncio.create_task(self._read())
            await self.send("Page.enable")
            await self.send("Runtime.enable")
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        for name in ("_reader", "_drain"):
            task = getattr(self, name, None)
            if task is not None:
                task.cancel()
        if getattr(self, "_ws", None) is not None:
            await self._ws.close()
        if getattr(self, "_session", None) is not None:
            await self._session.close()
        if self._proc.returncode is None:
            self._proc.terminate()
            try:
                async with asyncio.timeout(self.timeout_s):
                    await self._proc.wait()
            except TimeoutError:
                self._proc.kill()
                await self._proc.wait()
        shutil.rmtree(self._profile, ignore_errors=True)

    async def _listening(self) -> str:
        while True:
            line = await self._proc.stderr.readline()
            if not line:
                raise BrowserError(f"{self.path} exited before it listened (status {await self._proc.wait()})")
            match = _LISTENING.search(line)
            if match:
                return match.group(1).decode()

    async def _drain_stderr(self) -> None:
        while await self._proc.stderr.read(65536):
            pass

    async def _read(self) -> None:
        async for message in self._ws:
            data = orjson.loads(message.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future is not None and not future.done():
                    if "error" in data:
                        future.set_exception(BrowserError(str(data["error"])))
                    else:
                        future.set_result(data.get("result", {}))
            else:
                waiter = self._events.pop(data.get("method"), None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(data.get("params", {}))
        for future in self._pending.values():
            if not future.done():
                future.set_exception(BrowserError("the browser closed its DevTools connection"))

    async def send(self, method: str, **params) -> dict:
        call_id = next(self._ids)
        future = self._pending[call_id] = asyncio.get_running_loop().create_future()
        await self._ws.send_str(orjson.dumps({"id": call_id, "method": method, "params": params}).decode())
        async with asyncio.timeout(self.timeout_s):
            return await future

    async def open(self, url: str) -> None:
        """Navigates and waits for the page's load event."""
        loaded = self._events["Page.loadEventFired"] = asyncio.get_running_loop().create_future()
        result = await self.send("Page.navigate", url=url)
        if result.get("errorText"):
            raise BrowserError(f"{url}: {result['errorText']}")
        async with asyncio.timeout(self.timeout_s):
            await loaded

    async def evaluate(self, expression: str):
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, condition: str):
        """The value of the JavaScript expression `condition` once it is truthy, looked at again whenever the
        page's DOM changes."""
        return await self.evaluate(
            "new Promise(resolve => { const look = () => { const v = (" + condition + "); if (v) resolve(v); "
            "return v; }; if (!look()) { new MutationObserver((_, o) => { if (look()) o.disconnect(); })"
            ".observe(document, {subtree: true, childList: true, characterData: true, attributes: true}); } })")
