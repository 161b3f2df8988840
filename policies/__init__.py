"""Pluggable request policies: the interface lives in `policies.base`."""

from policies.base import Continue, Decision, Policy, PolicyChain, Reject

__all__ = ["Continue", "Decision", "Policy", "PolicyChain", "Reject"]
