"""The `groq-proxy` console script (and `python -m proxy`): `serve` holds SIGHUP before anything else is
imported (proxy/app/early_sighup.py), then the command runs (proxy/app/cli.py)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["serve"]:
        from proxy.app.early_sighup import hold

        hold()
    from proxy.app.cli import main as run

    return run(argv)
