"""Lists of files and batches filtered to the caller's own, paged as the provider pages them."""

from __future__ import annotations

import re

from aiohttp import web

from proxy.app.errors import ProxyError
from proxy.app.object_call import Call
from proxy.app.provider_objects import ID, parse

LIST_QUERY = {"after": ID, "limit": re.compile(r"[1-9][0-9]{0,4}"), "order": re.compile(r"asc|desc"),
              "purpose": re.compile(r"[a-z_]{1,32}")}
MAX_PAGES = 10  # provider pages read for one filtered list at most


async def filtered_list(request: web.Request, call: Call, tail: str, kind: str, on_mine=None) -> web.Response:
    """A list of the caller's own objects. The provider pages, the proxy filters: while a page leaves fewer
    than `limit` of the caller's own and the provider has more, the next provider page is read (up to
    MAX_PAGES), so a client that pages on `has_more` and the last id sees every object of its own.
    `on_mine(item)` is awaited for each object of the caller's that is listed."""
    objects, identity = call.objects, call.identity
    query = list_query(request)
    response = await objects.call("GET", tail, query=query)
    raw = await objects.read(response)
    if response.status != 200 or identity is None or identity.key is None:
        return call.passed(response, raw)
    limit = int(query["limit"]) if "limit" in query else None  # None: the provider's page, however long
    mine: list = []
    page = parse(raw)
    for pages in range(1, MAX_PAGES + 1):
        data = page.get("data") if isinstance(page, dict) else None
        if not isinstance(data, list):
            return call.passed(response, raw) if pages == 1 else call.list_page({"object": "list"}, mine, True)
        items = [item for item in data if isinstance(item, dict)]
        seen = await objects.visible(call.chain, identity, kind, [item.get("id") for item in items])
        for index, (item, ok) in enumerate(zip(items, seen)):
            if ok:
                mine.append(item)
                if on_mine is not None:
                    await on_mine(item)
                if len(mine) == limit:
                    more = index + 1 < len(items) or page.get("has_more") is True
                    return call.list_page(page, mine, more)
        last = items[-1].get("id") if items else None
        if page.get("has_more") is not True or not isinstance(last, str) or not ID.fullmatch(last):
            return call.list_page(page, mine, page.get("has_more") is True)
        if pages == MAX_PAGES:
            return call.list_page(page, mine, True)
        query["after"] = last
        response = await objects.call("GET", tail, query=query)
        raw = await objects.read(response)
        if response.status != 200:
            return call.passed(response, raw)
        page = parse(raw)
    raise AssertionError("unreachable")


def list_query(request: web.Request) -> dict[str, str]:
    """The list parameters OpenAI's clients send, checked; nothing else of the client's query goes upstream."""
    query = {}
    for name, pattern in LIST_QUERY.items():
        value = request.query.get(name)
        if value is None:
            continue
        if not pattern.fullmatch(value):
            raise ProxyError(400, f"Invalid value for `{name}`.", param=name, code="invalid_value")
        query[name] = value
    return query
