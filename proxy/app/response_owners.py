"""Who may continue a stored response: with `[auth]`, a response is the proxy key's that made it.

The provider stores a response (unless the request said `store: false`) under the proxy's provider key, which
every proxy key shares, so without a check any caller that learns an id could continue another's conversation
with `previous_response_id`. As for files and batches (proxy/app/provider_objects.py), the id the provider gives
is recorded in the policy store's owner map against the caller's key id, and a request naming another key's
response, or one nobody recorded, is refused before anything goes upstream with the 404 OpenAI gives for an
unknown id. The record is made before the client gets the answer (a plain answer before it is sent, a stream at
its commit point, where its id is known), so a client that continues at once finds it.

A store that cannot answer the check refuses the request (503, as for files): ownership unknown is never
guessed open. One that cannot take a record does not fail the answer being given; that response just cannot
be continued through the proxy (a warning is logged). Without `[auth]` there is one caller and nothing is
checked or recorded.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from policies.stores.base import StoreUnavailable
from proxy.app.errors import ProxyError
from proxy.app.provider_objects import ID, OWNER_TTL_S
from proxy.telemetry.logs import emit

if TYPE_CHECKING:
    from policies.chain import PolicyChain
    from policies.identity import Identity

_KIND = "response:"


def not_found(response_id: str) -> ProxyError:
    """What OpenAI answers for a `previous_response_id` it does not know."""
    return ProxyError(404, f"Previous response with id '{response_id[:128]}' not found.",
                      param="previous_response_id", code="previous_response_not_found")


async def check_previous(chain: "PolicyChain", identity: "Identity | None", body: dict) -> None:
    """Raises the 404 unless the request's `previous_response_id` (if any) is the caller's."""
    previous = body.get("previous_response_id")
    if previous is None or identity is None or identity.key is None or chain.store is None:
        return
    if not ID.fullmatch(previous):
        raise not_found(previous)
    try:
        owner = (await chain.store.owners([_KIND + previous]))[0]
    except StoreUnavailable:
        raise ProxyError(503, "Who owns a stored response cannot be checked now (the store is unavailable); try "
                         "again shortly.", type="server_error", code="policy_unavailable",
                         headers={"retry-after": "1"}) from None
    if owner != identity.key:
        raise not_found(previous)


async def record(chain: "PolicyChain", identity: "Identity | None", body: dict, response_id) -> None:
    """Records the caller as the owner of the response the provider stored."""
    if (identity is None or identity.key is None or chain.store is None or body.get("store") is False
            or not isinstance(response_id, str) or not ID.fullmatch(response_id)):
        return
    try:
        await chain.store.set_owner(_KIND + response_id, identity.key, OWNER_TTL_S)
    except StoreUnavailable:
        emit(logging.WARNING, "response_owner_not_recorded", key=identity.key,
             detail="the store is unavailable: this response cannot be continued with previous_response_id")
