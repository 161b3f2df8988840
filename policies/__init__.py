"""Pluggable request policies: proxy keys, per-request budgets, token budgets, throughput and concurrency.

The public interface: `Policy` and its decisions (`policies.base`), `Identity` (who is asking),
`set_estimator` (the prompt-token estimate), and the claim types a policy that counts in the shared store
uses (`policies.stores`). The pipeline runs them through `policies.chain.PolicyChain`.
"""

from policies.base import CONTINUE, Continue, Decision, Policy, Reject, Respond, Skip
from policies.chain import PolicyChain
from policies.estimate import set_estimator
from policies.identity import Identity
from policies.stores.base import Claim, Settlement

__all__ = ["CONTINUE", "Claim", "Continue", "Decision", "Identity", "Policy", "PolicyChain", "Reject", "Respond",
           "Settlement", "Skip", "set_estimator"]
