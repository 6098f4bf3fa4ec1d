"""``circus``: the umbrella command (``circus up``, ``circus backup``, ``circus restore``)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="circus", description="Circus, a Nix CI system")
    parser.add_argument("command", choices=["up", "backup", "restore"],
                        help="up: start a single-machine instance; backup DIR / restore DIR: "
                             "its database, secrets, logs and cache")
    args, rest = parser.parse_known_args(argv)
    if args.command == "up":
        from circus.cli.up import main as up_main

        return up_main(rest)
    if args.command in ("backup", "restore"):
        from circus.cli.backup import main as backup_main

        return backup_main(args.command, rest)
    return 2


if __name__ == "__main__":
    sys.exit(main())
