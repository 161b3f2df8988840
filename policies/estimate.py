"""The token estimate a budget reserves before the call; the upstream's reported usage settles it after.

It must be fast and work offline: tiktoken downloads its BPE file at first use, and an offline o200k table
costs about 143 MB of memory. Four bytes of UTF-8 per token, plus a few tokens per message for the chat
template, is close for English prose and errs high for code and other scripts; the settlement corrects it.

Replace it with `policies.set_estimator(fn)`, where `fn(body) -> int` estimates a request body's prompt
tokens (a custom policy module can call it at import time).
"""

from __future__ import annotations

from typing import Callable

PER_MESSAGE = 4  # role and separators of the chat template
PER_REQUEST = 3  # the assistant's reply prefix


def _text_bytes(value) -> int:
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, list):
        return sum(_text_bytes(v) for v in value)
    if isinstance(value, dict):
        text = value.get("text")
        if isinstance(text, str):
            return len(text.encode())
        return sum(_text_bytes(v) for k, v in value.items() if k != "type")
    return 0


def estimate_prompt_tokens(body: dict) -> int:
    """Chat: message contents (and tool calls) at 4 bytes a token; embeddings and the Responses API: the input
    the same way, with the Responses API's `instructions` and `tools` (its system prompt and tool definitions)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        total = PER_REQUEST
        for message in messages:
            if isinstance(message, dict):
                content = message.get("content")  # most often a string: measured here, without a call
                size = len(content) if content.__class__ is str and content.isascii() else _text_bytes(content)
                if "tool_calls" in message:
                    size += _text_bytes(message["tool_calls"])
                total += PER_MESSAGE + (size + 3) // 4
        tools = body.get("tools")
        if tools:
            total += (_text_bytes(tools) + 3) // 4
        return total
    size = _text_bytes(body.get("input")) + _text_bytes(body.get("instructions")) + _text_bytes(body.get("tools"))
    return (size + 3) // 4


_estimator: Callable[[dict], int] = estimate_prompt_tokens


def set_estimator(fn: Callable[[dict], int] | None) -> None:
    """Replaces the prompt estimate (None restores the built-in one)."""
    global _estimator
    _estimator = fn or estimate_prompt_tokens


def estimate(body: dict) -> int:
    tokens = _estimator(body)
    return tokens if tokens.__class__ is int and tokens >= 0 else max(0, int(tokens))


# The operations whose answer is generated text: their completion limit is reserved up front.
GENERATES = frozenset({"chat", "responses"})


def counts_tokens(ctx) -> bool:
    """Whether token budgets and token limits apply: not to audio (its operation says `tokens = False`),
    which is counted in requests and concurrency only."""
    op = getattr(ctx, "op", None)  # a policy's unit test may hand in a context of its own
    return op is None or op.tokens


def completion_limit(body: dict) -> int | None:
    value = body.get("max_completion_tokens")
    if value is None:
        value = body.get("max_tokens")
    if value is None:
        value = body.get("max_output_tokens")  # the Responses API's name
    return value if isinstance(value, int) and not isinstance(value, bool) else None


_UNUSED = frozenset({"fell_over", "passed_back", "skipped"})  # the upstream refused or failed: nothing generated


def used_tokens(ctx) -> int:
    """What a request used, to settle its reservation: the usage the upstream reported (`usage` of an answer,
    `x_groq.usage` or `usage` of a stream), else, for a stream cut short or a client gone, the prompt's
    estimate plus one token per content event that went out (each chunk of a Groq stream carries about one;
    the first, the role chunk, carries none). An attempt that failed before any answer used nothing."""
    op = getattr(ctx, "op", None)
    if op is not None and not op.tokens:  # counts_tokens, inline: every request settles
        return 0
    total = 0
    for attempt in ctx.attempts:
        usage = attempt.usage
        if isinstance(usage, dict):
            tokens = usage.get("total_tokens")
            if not isinstance(tokens, int):
                tokens = (usage.get("prompt_tokens") or 0) + (usage.get("completion_tokens") or 0)
            total += tokens
        elif attempt.outcome == "cancelled" or (attempt.first_byte is not None and attempt.outcome not in _UNUSED):
            total += ctx.policy.prompt_tokens + max(0, (getattr(attempt, "events", 0) or 0) - 1)
    return total
