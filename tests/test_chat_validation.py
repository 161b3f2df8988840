"""validate_chat on its own: which field a 400 names when several are wrong, and that every accepted value is
still accepted. Pins the behaviour of the one pass over the body's own fields (proxy/app/validation.py)."""

from __future__ import annotations

import itertools

import pytest

from proxy.app.errors import ProxyError
from proxy.app.validation import validate_chat

BASE = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
ORDER = ("stream", "temperature", "top_p", "frequency_penalty", "presence_penalty", "max_tokens",
         "max_completion_tokens", "n", "seed", "stream_options", "tools", "stop")
WRONG = {"stream": "yes", "temperature": "hot", "top_p": True, "frequency_penalty": [], "presence_penalty": {},
         "max_tokens": 0, "max_completion_tokens": 1.5, "n": "2", "seed": 1.0, "stream_options": [], "tools": {},
         "stop": 3}
RIGHT = {"stream": True, "temperature": 0, "top_p": 0.5, "frequency_penalty": -1, "presence_penalty": 1.5,
         "max_tokens": 1, "max_completion_tokens": 10, "n": 0, "seed": -3, "stream_options": {}, "tools": [],
         "stop": "x"}


def param_of(body: dict) -> str:
    with pytest.raises(ProxyError) as caught:
        validate_chat(body)
    assert caught.value.status == 400
    return caught.value.param


@pytest.mark.parametrize("a,b", list(itertools.combinations(ORDER, 2)))
def test_of_two_wrong_fields_the_first_in_the_check_order_is_named_whatever_the_body_order(a, b):
    assert param_of({**BASE, b: WRONG[b], a: WRONG[a]}) == a
    assert param_of({**BASE, a: WRONG[a], b: WRONG[b]}) == a


@pytest.mark.parametrize("name", ORDER)
def test_a_wrong_field_among_right_ones_is_named(name):
    body = {**BASE, **RIGHT, name: WRONG[name]}
    assert param_of(body) == name


def test_right_values_and_nulls_are_accepted():
    assert validate_chat({**BASE, **RIGHT}) == "m"
    assert validate_chat({**BASE, **dict.fromkeys(ORDER)}) == "m"
    assert validate_chat({**BASE, "user": 3, "unknown_field": object()}) == "m"  # not ours to judge


def test_int_subclasses_are_judged_as_before():
    class Count(int):
        pass

    assert validate_chat({**BASE, "max_tokens": Count(5), "temperature": Count(1)}) == "m"
    assert param_of({**BASE, "max_tokens": Count(0)}) == "max_tokens"
