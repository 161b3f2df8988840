"""The one error the bench raises: it could not measure. A missed target is reported, never raised."""


class BenchError(RuntimeError):
    """The harness could not measure (a process did not start, a check failed); not a missed target."""
