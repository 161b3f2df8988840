"""The `groq-proxy` console script (and `python -m proxy`): `serve` holds SIGHUP before anything else is
imported (proxy/app/early_sighup.py), then the command runs (proxy/app/cli.py), and ignores SIGHUP from its
end to the process's exit."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] != ["serve"]:
        from proxy.app.cli import main as run

        return run(argv)
    from proxy.app import early_sighup

    early_sighup.hold()
    try:
        from proxy.app.cli import main as run

        return run(argv)
    finally:
        early_sighup.ignore()  # to the exit: the interpreter's end would put SIGHUP's death back
