"""The response cache (`use = "cache"`): key, entry, the memory and Redis stores, coalescing, the policy."""
