"""The `rayhorde` command line."""

from __future__ import annotations

import argparse
import sys

from sqlalchemy import select

from api import ledger, node_keys
from api.auth import hash_api_key, new_api_key
from api.db.migrate import upgrade
from api.db.models import ROLES, User
from api.db.session import get_database
from api.settings import Settings


def _database():
    db = get_database(Settings().database_url)
    upgrade(db)
    return db


def _find(session, alias: str) -> User:
    """A user by `name#id` (or a bare id)."""
    name, _, raw_id = alias.rpartition("#")
    if not raw_id.isdigit():
        raise SystemExit(f"rayhorde: {alias!r} is not a user: give name#id or an id")
    user = session.get(User, int(raw_id))
    if user is None or (name and user.username != name):
        raise SystemExit(f"rayhorde: no user {alias}")
    return user


def users_create(args: argparse.Namespace) -> int:
    settings = Settings()
    db = _database()
    key = new_api_key()
    with db.write() as session:
        user = User(username=args.name, api_key_hash=hash_api_key(key, settings.key_salt),
                    node_public_key=node_keys.node_public_key(key), kudos=0.0,
                    **{role: True for role in args.role})
        session.add(user)
        session.flush()
        if args.kudos:
            ledger.award(session, user.id, args.kudos, ref="rayhorde users create")
        user_id = user.id
    # The key is shown once, here; only its hash is stored.
    print(f"user {args.name}#{user_id} created; API key: {key}")
    return 0


def users_role(args: argparse.Namespace) -> int:
    with _database().write() as session:
        user = _find(session, args.user)
        for role in args.add:
            setattr(user, role, True)
        for role in args.remove:
            setattr(user, role, False)
        roles = [r for r in ROLES if getattr(user, r)]
        print(f"{user.username}#{user.id}: {', '.join(roles) or 'no roles'}")
    return 0


def users_kudos(args: argparse.Namespace) -> int:
    with _database().write() as session:
        user = _find(session, args.user)
        ledger.award(session, user.id, args.amount, ref="rayhorde users kudos")
        session.refresh(user)
        print(f"{user.username}#{user.id}: {user.kudos:.2f} kudos")
    return 0


def users_list(_args: argparse.Namespace) -> int:
    with _database().read() as session:
        for user in session.execute(select(User).order_by(User.id)).scalars():
            roles = ",".join(r for r in ROLES if getattr(user, r))
            print(f"{user.username}#{user.id}\t{user.kudos:.2f}\t{roles}")
    return 0


def migrate(_args: argparse.Namespace) -> int:
    _database()
    print("database is at the latest schema")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rayhorde", description="rayhorde cluster tools")
    sub = parser.add_subparsers(dest="command", required=True)
    users = sub.add_parser("users", help="manage users (database from RAYHORDE_DATABASE_URL)")
    users_sub = users.add_subparsers(dest="action", required=True)
    create = users_sub.add_parser("create", help="create a user and print its API key")
    create.add_argument("name")
    create.add_argument("--kudos", type=float, default=0.0, help="starting kudos (an award)")
    create.add_argument("--role", action="append", default=[], choices=ROLES)
    create.set_defaults(func=users_create)
    role = users_sub.add_parser("role", help="give or take roles")
    role.add_argument("user", help="name#id")
    role.add_argument("--add", action="append", default=[], choices=ROLES)
    role.add_argument("--remove", action="append", default=[], choices=ROLES)
    role.set_defaults(func=users_role)
    kudos = users_sub.add_parser("kudos", help="award kudos (negative takes them back)")
    kudos.add_argument("user", help="name#id")
    kudos.add_argument("amount", type=float)
    kudos.set_defaults(func=users_kudos)
    users_sub.add_parser("list", help="every user with kudos and roles").set_defaults(func=users_list)
    sub.add_parser("migrate", help="apply database migrations").set_defaults(func=migrate)
    from cluster.generate_cli import add_parser as add_generate_parser
    add_generate_parser(sub)
    from cluster.nodes_cli import add_parsers as add_node_parsers
    add_node_parsers(sub)
    from cluster.http_worker import add_parser as add_worker_parser
    add_worker_parser(sub)
    from cluster.run_cli import add_parser as add_run_parser
    add_run_parser(sub)
    from cluster.models_cli import add_parser as add_models_parser
    add_models_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
