"""Mint a Hypha token signed with the Hypha server's JWT secret (read from $HYPHA_JWT_SECRET).

    python mint_token.py bioadapt --days 365              # the service's own token: it registers in ws-user-bioadapt
    python mint_token.py alice --grant ws-user-bioadapt   # a user who may call the service in that workspace

Only for a Hypha server you run yourself (compose, Kubernetes, HPC) with HYPHA_JWT_SECRET set; a hosted server
gives tokens through its own login.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("user", help="the user id the token is for (its own workspace is ws-user-<user>)")
    parser.add_argument("--grant", action="append", default=[], metavar="WORKSPACE",
                        help="a workspace the user may use the services of (read permission); repeatable")
    parser.add_argument("--days", type=float, default=30, help="validity in days (default 30)")
    args = parser.parse_args(argv)
    secret = os.environ.get("HYPHA_JWT_SECRET")
    if not secret:
        print("mint_token.py: set HYPHA_JWT_SECRET to the Hypha server's JWT secret", file=sys.stderr)
        return 2
    from bioadapt.service.hypha_server import mint_token

    print(mint_token(args.user, workspaces={workspace: "r" for workspace in args.grant},
                     expires_in=int(args.days * 86400), jwt_secret=secret))
    return 0


if __name__ == "__main__":
    sys.exit(main())
