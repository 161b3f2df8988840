"""Reload: the config file read again, checked, and swapped in while requests keep flowing (SIGHUP, or
POST /admin/reload).

Everything built from one config is one `Generation`: the config, the router, the pipeline with its policy
chain, the model list. A request reads the app's generation once, when it starts, and runs on it to its end;
a reload builds the next generation beside it and installs it in one assignment, so no request ever sees half
of each. The old generation is retired: when its last request ends, its policy chain is closed (its store too,
unless the new chain shares it).

What the proxy has learned of the upstreams is not per config and carries over: the pooled connections (the
one upstream client, whose pools are per origin), the cool-downs and failure counts, observed latency and key
pools of the providers and models still configured, Groq's rate-limit view, and the counters in the policy
store (the same store when `[store]` is unchanged; Redis keys survive any reload).

Some keys are read only at start-up: the listener (`server.host`, `port`, `admin_port` and the request limits
aiohttp applies per connection) and `[telemetry]`. A reload that changes them applies the rest and says which
need a restart; the running config (GET /admin/config) keeps their running values.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import fields, replace
from typing import Callable

import orjson

from policies.config import check_workers
from proxy.app import early_sighup
from proxy.app.config import Config, ConfigError, ServerConfig, load_config
from proxy.app.policy_routes import close_chain, open_chain
from proxy.pipeline.pipeline import Pipeline
from proxy.routing.cooldown import Cooldowns
from proxy.routing.router import Router
from proxy.routing.state import RoutingState
from proxy.telemetry.logs import emit, log, register_secrets
from proxy.telemetry.metrics import Counter, Gauge
from proxy.telemetry.observe import Observer
from proxy.upstream.providers import Upstreams

# The [server] keys a reload applies; every other one is read at start-up only.
LIVE_SERVER_KEYS = ("admin_key_env", "admin_key", "keepalive_s", "log_level")


class Generation:
    """What one config builds. Never changed once built; `active` counts the requests running on it."""

    __slots__ = ("number", "config", "router", "pipeline", "models", "models_body", "active", "_on_idle")

    def __init__(self, number: int, config: Config, router: Router, pipeline: Pipeline, models: list) -> None:
        self.number = number
        self.config = config
        self.router = router
        self.pipeline = pipeline
        self.models = models
        self.models_body = orjson.dumps({"object": "list", "data": models})
        self.active = 0
        self._on_idle: Callable[[], None] | None = None

    def enter(self) -> None:
        self.active += 1

    def leave(self) -> None:
        self.active -= 1
        if self.active == 0 and self._on_idle is not None:
            on_idle, self._on_idle = self._on_idle, None
            on_idle()

    def retire(self, on_idle: Callable[[], None]) -> None:
        """`on_idle` runs once no request runs on this generation (at once when none does)."""
        if self.active == 0:
            on_idle()
        else:
            self._on_idle = on_idle


class ReloadRefused(Exception):
    """The new config was not installed; the message says why (it names the key, and never a secret)."""


class Reloads:
    """Builds generations, installs them in the app's state, and retires the ones they replace."""

    def __init__(self, state, upstreams: Upstreams, tracer, metrics, models_list: Callable[[Config], list],
                 simulator_url: str | None = None) -> None:
        self._state = state
        self._upstreams = upstreams  # the owner of the client: closed by the app, never by a reload
        self._tracer = tracer
        self._metrics = metrics
        self._models_list = models_list
        self._simulator_url = simulator_url
        self._cooldowns: Cooldowns | None = None
        self._lock = asyncio.Lock()
        self._live: list[Generation] = []  # the current one, and retired ones whose chain is not closed yet
        self._tasks: set[asyncio.Task] = set()
        self._sighup_before = None  # what SIGHUP did before the loop's handler: put back at the end
        self._closing = False
        self.count = 0
        self._reloads = self._generation = None
        if metrics is not None:  # with workers, each counts its own: summed, and the gauge kept per worker
            self._reloads = Counter("groq_proxy_reloads_total", "Config reloads (SIGHUP, POST /admin/reload) by "
                                    "result: ok (installed) or error (refused; the running config stays).", ("result",))
            for result in ("ok", "error"):  # both series from the start: an alert on error sees a rise from 0
                self._reloads.inc((result,), 0)
            self._generation = Gauge("groq_proxy_config_generation", "The running config's generation: 1 at start, "
                                     "one more per reload installed.")
            metrics.all = metrics.all + (self._reloads, self._generation)

    # --- building --------------------------------------------------------------------------------------

    async def build(self, config: Config, previous: Generation | None = None) -> Generation:
        register_secrets(*(key for p in config.providers.values() for key in (p.api_keys or (p.api_key,))),
                         config.server.admin_key)
        if self._cooldowns is None:
            self._cooldowns = Cooldowns(config.routing)
        old_pipeline = previous.pipeline if previous is not None else None
        upstreams = self._upstreams if previous is None else self._upstreams.sharing(config)
        router = Router(config)
        observer = Observer(config, self._tracer, self._metrics,
                            previous=old_pipeline.observer if old_pipeline is not None else None)
        routing = RoutingState(config, previous=old_pipeline.routing if old_pipeline is not None else None)
        chain = await open_chain(config, self._metrics,  # last: it may open a store
                                 (previous.config, old_pipeline.policies) if previous is not None else None)
        chain.record = observer.decision
        pipeline = Pipeline(config, upstreams, self._cooldowns, chain, observer, routing=routing, router=router)
        self.count += 1
        return Generation(self.count, config, router, pipeline, self._models_list(config))

    async def start(self, config: Config) -> Generation:
        generation = await self.build(config)
        self._install(generation)
        return generation

    def _install(self, generation: Generation) -> None:
        """The swap: one assignment of each name, no await in between."""
        self._cooldowns.reconfigure(generation.config.routing)
        self._state.install(generation)
        self._live.append(generation)
        if self._generation is not None:
            self._generation.set((), generation.number)

    # --- reloading -------------------------------------------------------------------------------------

    def read(self) -> Config:
        """The running config's file, read and checked again (the packaged default when it was that)."""
        source = self._state.config.source
        if source.startswith("<") and source != "<default>":
            raise ConfigError(f"config: the running config was not read from a file ({source}); there is nothing "
                              "to read again")
        return load_config(None if source == "<default>" else source)

    def merged(self, running: Config, new: Config) -> tuple[Config, list[str]]:
        """`new` with the start-up-only keys at their running values, and the names of those it changed."""
        new = replace(new, server=replace(new.server, **self._state.server_overrides))
        restart = [f"server.{f.name}" for f in fields(ServerConfig)
                   if f.name not in LIVE_SERVER_KEYS and getattr(running.server, f.name) != getattr(new.server, f.name)]
        if new.telemetry != running.telemetry:
            restart.append("telemetry")
        server = replace(running.server, **{k: getattr(new.server, k) for k in LIVE_SERVER_KEYS})
        config = replace(new, server=server, telemetry=running.telemetry)
        if self._simulator_url is not None:
            config = config.with_base_urls(self._simulator_url)
        return config, restart

    async def reload(self, trigger: str) -> dict:
        """Reads, checks and installs the config; returns what the admin call answers. Raises ReloadRefused
        (logged here) when the file is bad; the running config stays."""
        async with self._lock:  # one at a time: two reloads must not both retire the same generation
            running = self._state.generation
            if self._closing or running is None:
                raise ReloadRefused("the proxy is stopping")
            try:
                config, restart = self.merged(running.config, self.read())
                if config.policies is not None:  # what `serve --workers N` refuses at the start, a reload refuses
                    check_workers(config.policies, config.server.workers)
                generation = await self.build(config, running)
            except ConfigError as exc:
                self._count("error")
                emit(logging.ERROR, "config_reload_refused", trigger=trigger, error=str(exc),
                     generation=running.number, message="The config was not reloaded; the running one stays.")
                raise ReloadRefused(str(exc)) from None
            except Exception:
                self._count("error")
                emit(logging.ERROR, "config_reload_refused", trigger=trigger, generation=running.number,
                     exc_info=True, message="The config was not reloaded; the running one stays.")
                raise ReloadRefused("the new config could not be built (see the proxy's log)") from None
            self._install(generation)
            self._count("ok")
            running.retire(lambda: self._close_later(running))
            if config.server.log_level != running.config.server.log_level:
                log.setLevel(config.server.log_level.upper())
            emit(logging.INFO, "config_reloaded", trigger=trigger, generation=generation.number, source=config.source,
                 restart_required=restart)
            return {"status": "reloaded", "generation": generation.number, "source": config.source,
                    "restart_required": restart}

    def _count(self, result: str) -> None:
        if self._reloads is not None:
            self._reloads.inc((result,))

    def _close_later(self, generation: Generation) -> None:
        task = asyncio.get_running_loop().create_task(self._close(generation))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _close(self, generation: Generation) -> None:
        """The retired generation's chain, once its last request ended; its store only if no other uses it."""
        if generation not in self._live:  # the app's end closed it already
            return
        self._live.remove(generation)
        chain = generation.pipeline.policies
        shared = any(g.pipeline.policies.store is chain.store for g in self._live)
        try:
            await close_chain(chain, keep_store=shared)
        except Exception:
            emit(logging.WARNING, "policy_chain_close_failed", generation=generation.number, exc_info=True)

    # --- SIGHUP and the end ----------------------------------------------------------------------------

    def handle_sighup(self) -> None:
        """SIGHUP reloads (a worker supervisor forwards it to each worker). Only where the loop can take
        signals: the main thread of a Unix process. One that came while the proxy started (held by
        proxy/app/early_sighup.py) reloads now: the file may have changed after the start read it."""
        self._sighup_before = early_sighup.install(asyncio.get_running_loop(), self._on_sighup)
        if self._sighup_before is not None and early_sighup.take():
            self._on_sighup()

    def _on_sighup(self) -> None:
        task = asyncio.get_running_loop().create_task(self._quiet_reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _quiet_reload(self) -> None:
        try:
            await self.reload("SIGHUP")
        except ReloadRefused:
            pass  # logged where it was refused

    async def close(self) -> None:
        """At the app's end: every chain not closed yet, each store once."""
        self._closing = True
        if self._sighup_before is not None:
            early_sighup.restore(asyncio.get_running_loop(), self._sighup_before)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        closed: set[int] = set()
        for generation in self._live:
            chain = generation.pipeline.policies
            await close_chain(chain, keep_store=id(chain.store) in closed)
            closed.add(id(chain.store))
        self._live.clear()
