"""The `rayhorde` command line."""

from __future__ import annotations

import argparse
import sys

from api.auth import hash_api_key, new_api_key
from api.db.migrate import upgrade
from api.db.models import User
from api.db.session import get_database
from api.settings import Settings


def users_create(args: argparse.Namespace) -> int:
    settings = Settings()
    db = get_database(settings.database_url)
    upgrade(db)
    key = new_api_key()
    with db.write() as session:
        user = User(username=args.name, api_key_hash=hash_api_key(key, settings.key_salt),
                    kudos=args.kudos)
        session.add(user)
        session.flush()
        user_id = user.id
    # The key is shown once, here; only its hash is stored.
    print(f"user {args.name}#{user_id} created; API key: {key}")
    return 0


def migrate(_args: argparse.Namespace) -> int:
    upgrade(get_database(Settings().database_url))
    print("database is at the latest schema")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rayhorde", description="rayhorde cluster tools")
    sub = parser.add_subparsers(dest="command", required=True)
    users = sub.add_parser("users", help="manage users").add_subparsers(dest="action",
                                                                       required=True)
    create = users.add_parser("create", help="create a user and print its API key")
    create.add_argument("name")
    create.add_argument("--kudos", type=float, default=0.0)
    create.set_defaults(func=users_create)
    sub.add_parser("migrate", help="apply database migrations").set_defaults(func=migrate)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
