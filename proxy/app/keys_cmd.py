"""`groq-proxy keys new` and `groq-proxy keys hash`: make a proxy key and the config line that admits it.

The config holds only the key's SHA-256; the key itself is printed once, to whoever ran the command.
`keys hash` reads the key from stdin, so it never sits in the shell's history or the process list.
"""

from __future__ import annotations

import sys

from policies.identity import hash_key, new_key


def cmd_keys(args) -> int:
    if args.keys_command == "new":
        key, digest = new_key()
        print(key)
        print(f"# add to the config (the key above is shown only now):\n[[auth.keys]]\nid = \"{args.id}\"\n"
              f"sha256 = \"{digest}\"", file=sys.stderr)
        return 0
    key = sys.stdin.readline().strip()
    if not key:
        print("groq-proxy: keys hash reads the key from stdin (echo -n \"$KEY\" | groq-proxy keys hash)",
              file=sys.stderr)
        return 2
    print(hash_key(key))
    return 0


def add_keys_parser(sub) -> None:
    keys = sub.add_parser("keys", help="make or hash proxy keys for [auth]")
    which = keys.add_subparsers(dest="keys_command", required=True)
    new = which.add_parser("new", help="print a fresh key (stdout) and its [[auth.keys]] entry (stderr)")
    new.add_argument("--id", default="my-app", help="the id the entry gets (default: my-app)")
    which.add_parser("hash", help="print the sha256 of a key read from stdin")
    keys.set_defaults(func=cmd_keys)
