"""`request_budget`: what one request may use, by request type (`x-request-type`).

A prompt estimated over its type's prompt budget is refused (400 `request_budget_exceeded`). A completion limit
(`max_completion_tokens` or `max_tokens`) over the completion budget is lowered to it, and the answer says so
in `x-groq-proxy-completion-limit`; with `over_completion = "reject"` it is refused instead. A request with no
limit gets the budget as its limit. Types not configured use `default`. Nothing is shared, so no store.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

from policies.base import CONTINUE, Decision, Policy, Reject
from policies.estimate import completion_limit
from policies.schema import check_keys, choice, count, table
from proxy.app.config import ConfigError

DEFAULT_TYPES = {
    "default": (1000, 1000),
    "chat": (2000, 1000),
    "summarization": (4000, 1000),
    "contentGeneration": (1000, 4000),
}


class RequestBudget(Policy):
    def __init__(self, types: Mapping[str, tuple[int, int]] | None = None, over_completion: str = "lower") -> None:
        self.types = MappingProxyType({**DEFAULT_TYPES, **(types or {})})
        self.reject_over = over_completion == "reject"

    @classmethod
    def options(cls, raw: Mapping, where: str) -> dict:
        check_keys(raw, {"types", "over_completion"}, where)
        types = {}
        for name, budget in table(raw, "types", where).items():
            at = f"{where}.types.{name}"
            if not isinstance(budget, Mapping):
                raise ConfigError(f"{at}: must be a table like {{ prompt = 2000, completion = 1000 }}")
            check_keys(budget, {"prompt", "completion"}, at)
            default = DEFAULT_TYPES.get(name, DEFAULT_TYPES["default"])
            types[name] = (count(budget, "prompt", at, default[0]), count(budget, "completion", at, default[1]))
        return {"types": types, "over_completion": choice(raw, "over_completion", where, ("lower", "reject"), "lower")}

    async def on_request(self, ctx) -> Decision:
        if not ctx.policy.counts:
            return CONTINUE
        prompt_budget, completion_budget = self.types.get(ctx.request_type) or self.types["default"]
        prompt = ctx.policy.prompt_tokens
        if prompt > prompt_budget:
            return Reject(400, f"The prompt is estimated at {prompt} tokens, over the {prompt_budget}-token prompt "
                          f"budget of request type `{ctx.request_type}`.", code="request_budget_exceeded",
                          param="messages")
        if ctx.operation != "chat":
            return CONTINUE
        body = ctx.body
        limit = completion_limit(body)
        if limit is not None and limit <= completion_budget:
            return CONTINUE
        if limit is not None and self.reject_over:
            field = limit_field(body)
            return Reject(400, f"`{field}` is {limit}, over the {completion_budget}-token completion budget of "
                          f"request type `{ctx.request_type}`.", code="request_budget_exceeded", param=field)
        if self.mode == "enforce":
            lower(body, limit, completion_budget, ctx.policy.headers)
        return CONTINUE


def limit_field(body: dict) -> str:
    """The completion limit's field a lowered limit is written to: the one the client used."""
    return "max_tokens" if "max_completion_tokens" not in body and "max_tokens" in body else "max_completion_tokens"


def lower(body: dict, limit: int | None, budget: int, headers: dict) -> None:
    """Sets the completion limit to the budget; the answer says so when the client had asked for more."""
    body["max_tokens" if "max_completion_tokens" not in body and "max_tokens" in body else "max_completion_tokens"] = budget
    if limit is not None:
        headers["x-groq-proxy-completion-limit"] = f"{budget}; lowered from {limit}"
