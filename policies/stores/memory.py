"""The memory store: counters in plain dicts, for one process.

Every operation runs without an `await` in between, so on one event loop it is atomic the way the Redis
script is. It is the default; it is also what makes a limit per process: a gateway that runs several
processes must use Redis (`policies.config.check_workers` refuses otherwise).

aiolimiter would serve one rate limit, but it takes its capacity one limiter at a time: a request refused by
its second limit would already have spent the first. The GCRA here checks every claim before taking any,
exactly as the Redis script does, so both stores agree on every decision, and with the script's arithmetic
(the arrival time stored as it was checked, the remaining floored from one division) on the x-ratelimit-* numbers.
"""

from __future__ import annotations

import asyncio
import math
import time
from math import floor
from typing import Callable, Sequence

from policies.stores.base import BUDGET, GCRA, SLOT, Admission, Claim, Settlement


class MemoryStore:
    backend = "memory"
    available = True

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._tat: dict[str, float] = {}
        self._budgets: dict[str, list] = {}  # key -> [used, reserved, expires_at]
        self._slots: dict[str, int] = {}
        self._freed = asyncio.Event()
        self._waiting = 0  # requests in changed(): only they need telling that a slot was freed
        self._next_prune = 0.0
        self._owners: dict[str, tuple[str, float]] = {}  # name -> (owner, expires_at)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def status(self) -> dict:
        return {"backend": "memory", "status": "ok"}

    async def admit(self, claims: Sequence[Claim]) -> Admission:
        return self.admit_now(claims)

    async def settle(self, settlements: Sequence[Settlement]) -> None:
        self.settle_now(settlements)

    def admit_now(self, claims: Sequence[Claim]) -> Admission:
        """`admit` without a coroutine: the chain calls it directly, as nothing here waits."""
        now = self.clock()
        if now >= self._next_prune:
            self._prune(now)
        failed, retry, over = -1, 0.0, ()
        remaining, reset = [], []
        tats, budgets, slots = self._tat, self._budgets, self._slots
        for i, c in enumerate(claims):  # runs for every request
            kind, key, limit, amount, param = c.kind, c.key, c.limit, c.amount, c.param
            if kind == GCRA:
                step = param / limit
                tat = tats.get(key, now)
                if tat < now:
                    tat = now
                if amount > limit:
                    fits, wait, left, back = False, -1.0, floor((now + param - tat) / step), tat - now
                else:
                    new = tat + amount * step
                    wait = new - param - now
                    fits, left, back = wait <= 0, floor((now + param - new) / step), new - now
            elif kind == BUDGET:
                rec = budgets.get(key)
                left = limit - amount - (0 if rec is None or rec[2] <= now else rec[0] + rec[1])
                fits = left >= 0
                wait = back = param - now
            else:
                held = slots.get(key, 0)
                fits, wait, left, back = held < limit, 0.0, limit - held - 1, 0.0
            remaining.append(left)
            reset.append(back)
            if not fits:
                if c.soft:
                    over += (i,)
                elif failed < 0:
                    failed, retry = i, wait
        if failed >= 0:
            return Admission(False, failed, retry, over, remaining, reset)
        for c in claims:
            kind, key = c.kind, c.key
            if kind == GCRA:
                tat = tats.get(key, now)
                tats[key] = (tat if tat > now else now) + c.amount * (c.param / c.limit)  # the `new` it checked
            elif kind == BUDGET:
                rec = budgets.get(key)
                if rec is None or rec[2] <= now:
                    budgets[key] = [0, c.amount, c.param]
                else:
                    rec[1] += c.amount
            else:
                slots[key] = slots.get(key, 0) + 1
        return Admission(True, -1, 0.0, over, remaining, reset)

    def settle_now(self, settlements: Sequence[Settlement]) -> None:
        now = self.clock()
        freed = False
        for s in settlements:
            kind, key, reserved, used = s.kind, s.key, s.reserved, s.used
            if kind == GCRA:
                tat = self._tat.get(key)
                if tat is not None and used != reserved:
                    self._tat[key] = max(now, tat + (used - reserved) * s.param / s.limit)
            elif kind == BUDGET:
                rec = self._budgets.get(key)
                if rec is not None and rec[2] > now:
                    rec[0] += used
                    rec[1] = rec[1] - reserved if rec[1] > reserved else 0
            elif kind == SLOT:
                held = self._slots.get(key, 0)
                if held > 1:
                    self._slots[key] = held - 1
                else:
                    self._slots.pop(key, None)
                freed = True
        if freed and self._waiting:  # a request queued for a slot (wait_s) looks again
            self._freed.set()
            self._freed = asyncio.Event()

    def release_now(self, claims: Sequence[Claim], used: int) -> None:
        """Settles admitted claims to what their request used, as `settle` would their Settlements (see
        `PolicyChain._settle_claims`): a budget or a tokens limit is charged `used` (-1: unknown, what it
        reserved) in place of what it reserved, a slot is freed, a requests limit has nothing to correct."""
        now = self.clock()
        freed = False
        for c in claims:
            kind = c.kind
            if kind == SLOT:
                held = self._slots.get(c.key, 0)
                if held > 1:
                    self._slots[c.key] = held - 1
                else:
                    self._slots.pop(c.key, None)
                freed = True
            elif kind == BUDGET:
                rec = self._budgets.get(c.key)
                if rec is not None and rec[2] > now:
                    rec[0] += c.amount if used < 0 else used
                    rec[1] = rec[1] - c.amount if rec[1] > c.amount else 0
            elif c.header == "tokens" and used >= 0 and used != c.amount:
                tat = self._tat.get(c.key)
                if tat is not None:
                    self._tat[c.key] = max(now, tat + (used - c.amount) * c.param / c.limit)
        if freed and self._waiting:  # a request queued for a slot (wait_s) looks again
            self._freed.set()
            self._freed = asyncio.Event()

    # --- a plan's step (policies.plan): the built-ins' claims as rows, checked and taken in one pass ----------

    def take(self, gcras: Sequence[tuple], budgets: Sequence[tuple], slots: Sequence[tuple],
             tokens: int) -> list[tuple[float, float]] | None:
        """`admit_now` for a plan's rows: GCRA (key, limit, period, step, per_token), budget (key, limit,
        expires), slot (key, limit); `tokens` is the amount of a budget and of a per_token GCRA, a GCRA's
        other amount is 1, a slot's 1. When every row fits, takes them all and returns each GCRA row's
        (remaining, reset); when one does not (a soft one too), takes nothing and returns None: `admit_now`
        then says which and why. The same arithmetic as `admit_now`, so both decide alike."""
        now = self.clock()
        if now >= self._next_prune:
            self._prune(now)
        taken: list[tuple[dict, str, object]] = []  # (counters, key, value before): put back if a later one fails
        out = []
        if gcras:
            tats = self._tat
            for key, limit, period, step, per_token in gcras:
                amount = tokens if per_token else 1
                before = tats.get(key)
                tat = before if before is not None and before > now else now
                new = tats[key] = tat + amount * step
                if amount > limit or new - period - now > 0:
                    return _put_back(taken, (tats, key, before))
                taken.append((tats, key, before))
                out.append((floor((now + period - new) / step), new - now))
        if budgets:
            records = self._budgets
            for key, limit, expires in budgets:
                rec = records.get(key)
                if rec is None or rec[2] <= now:
                    if limit < tokens:
                        return _put_back(taken)
                    records[key] = [0, tokens, expires]
                elif limit - tokens - (rec[0] + rec[1]) < 0:
                    return _put_back(taken)
                else:
                    records[key] = [rec[0], rec[1] + tokens, rec[2]]
                taken.append((records, key, rec))
        if slots:
            held_by = self._slots
            for key, limit in slots:
                held = held_by.get(key)
                if held is None:
                    if limit < 1:
                        return _put_back(taken)
                    held_by[key] = 1
                elif held >= limit:
                    return _put_back(taken)
                else:
                    held_by[key] = held + 1
                taken.append((held_by, key, held))
        return out

    def give_back(self, gcras: Sequence[tuple], budgets: Sequence[tuple], slots: Sequence[tuple], tokens: int,
                  used: int) -> None:
        """`release_now` for what `take` took: the per_token GCRA rows (`gcras`) and the budgets are charged
        `used` (-1: unknown, `tokens` stand) in place of `tokens`, the slots freed."""
        now = self.clock()
        if slots:
            held_by = self._slots
            for key, _ in slots:
                held = held_by.get(key, 0)
                if held > 1:
                    held_by[key] = held - 1
                else:
                    held_by.pop(key, None)
            if self._waiting:  # a request queued for a slot (wait_s) looks again
                self._freed.set()
                self._freed = asyncio.Event()
        if budgets:
            records, charge = self._budgets, tokens if used < 0 else used
            for key, _, _ in budgets:
                rec = records.get(key)
                if rec is not None and rec[2] > now:
                    rec[0] += charge
                    rec[1] = rec[1] - tokens if rec[1] > tokens else 0
        if gcras and used >= 0 and used != tokens:
            tats = self._tat
            for key, limit, period, _, _ in gcras:
                tat = tats.get(key)
                if tat is not None:
                    tat += (used - tokens) * period / limit
                    tats[key] = tat if tat > now else now

    async def read(self, claims: Sequence[Claim]) -> list[tuple[float, float]]:
        now = self.clock()
        out = []
        for c in claims:
            if c.kind == GCRA:
                tat = self._tat.get(c.key, now)
                out.append((max(0.0, math.ceil((tat - now) * c.limit / c.param - 1e-9)), 0.0))
            elif c.kind == BUDGET:
                rec = self._budgets.get(c.key)
                out.append((0, 0) if rec is None or rec[2] <= now else (rec[0], rec[1]))
            else:
                out.append((self._slots.get(c.key, 0), 0))
        return out

    async def changed(self, timeout: float) -> None:
        self._waiting += 1
        try:
            await asyncio.wait_for(self._freed.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            self._waiting -= 1

    def _prune(self, now: float) -> None:
        """Drops what has expired, so identities that came once (a client's `user` field) do not pile up."""
        self._next_prune = now + 60.0
        self._budgets = {k: v for k, v in self._budgets.items() if v[2] > now}
        self._tat = {k: v for k, v in self._tat.items() if v > now}
        self._owners = {k: v for k, v in self._owners.items() if v[1] > now}

    # --- owners (base.Owners) ----------------------------------------------------------------------------

    async def set_owner(self, name: str, owner: str, ttl_s: float) -> None:
        now = self.clock()
        if now >= self._next_prune:
            self._prune(now)
        self._owners[name] = (owner, now + ttl_s)

    async def owners(self, names: Sequence[str]) -> list[str | None]:
        now = self.clock()
        out = []
        for name in names:
            found = self._owners.get(name)
            out.append(found[0] if found is not None and found[1] > now else None)
        return out

    async def drop_owner(self, name: str) -> None:
        self._owners.pop(name, None)


def _put_back(taken: list[tuple[dict, str, object]], *last: tuple[dict, str, object]) -> None:
    """Undoes what `take` took before a row did not fit (`last`: that row, when it was written before it was
    checked): all or nothing, as `admit_now`."""
    for counters, key, before in reversed([*taken, *last]):
        if before is None:
            counters.pop(key, None)
        else:
            counters[key] = before
