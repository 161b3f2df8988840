"""Operator tools off the request path: the model benchmark and the live catalogue check."""
