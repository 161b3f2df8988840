"""Where shared counters live: `memory` (one process) or `redis` (shared by every replica).

Policies never talk to a store. They hand the pipeline `Claim`s; the policy chain sends every claim of a
request to the store in one `admit` call (one Redis round trip, one Lua script) and every settlement in one
`settle` call. See `policies.stores.base` for the protocol.
"""

from policies.stores.base import Admission, Claim, Settlement, Store, StoreUnavailable

__all__ = ["Admission", "Claim", "Settlement", "Store", "StoreUnavailable"]
