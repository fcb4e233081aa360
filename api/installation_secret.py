"""The installation's secret (Settings.key_salt): it salts API key hashes and signs local
storage's upload URLs, so it must never be a constant anyone can read in the repository.

Unless RAYHORDE_KEY_SALT (or `key_salt` in the config) gives one, it is read from a file,
made on first start with 32 random bytes and owner-only permissions (0600). The file lives
beside the SQLite database (it guards that database's key hashes, and moves with it), or at
./data/rayhorde-cluster.secret when the database is elsewhere (PostgreSQL); `secret_file`
names another place.

A SQLite database that already holds API keys when the file is first made was written by an
older rayhorde, which hashed keys with the public LEGACY_SALT: that salt is then kept (in the
file, with a warning), or every existing key would stop working.

A cluster's API and dispatcher replicas get the secret the application was built with
(cluster/app.py), so they agree wherever they run; a cluster of several nodes should set
RAYHORDE_KEY_SALT on every node instead (the file is on one node only), and is warned when it
does not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import sqlite3
import stat
import tempfile
from pathlib import Path

log = logging.getLogger("rayhorde.settings")

LEGACY_SALT = "rayhorde-default-salt"  # what rayhorde used before it made secrets
CLUSTER_SECRET_FILE = Path("data") / "rayhorde-cluster.secret"  # when the database is not SQLite
_warned: set[tuple[str, str]] = set()


def sqlite_path(database_url: str) -> Path | None:
    """The file of a SQLite database URL; None for PostgreSQL or an in-memory database."""
    if not database_url.startswith("sqlite:///"):
        return None
    path = database_url.removeprefix("sqlite:///").split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def secret_path(settings) -> Path:
    """`secret_file`, else beside the SQLite database (data/rayhorde.db: data/rayhorde.secret),
    else data/rayhorde-cluster.secret."""
    if settings.secret_file:
        return Path(settings.secret_file)
    db_file = sqlite_path(settings.database_url)
    return db_file.with_suffix(".secret") if db_file is not None else CLUSTER_SECRET_FILE


def is_cluster_config(settings) -> bool:
    """PostgreSQL or non-local storage: a configuration meant for several machines."""
    return sqlite_path(settings.database_url) is None or settings.storage != "local"


def _warn_once(key: tuple[str, str], message: str, *args) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


def resolve(settings):
    """Fill in `key_salt` when none was configured, and check the settings a replica read from
    its own environment against the application's build (`env_digests`)."""
    check_env_digests(settings)
    if settings.key_salt:
        if settings.key_salt == LEGACY_SALT and is_cluster_config(settings):
            _warn_once(("legacy", settings.database_url),
                       "key_salt is the public default %r: set RAYHORDE_KEY_SALT to a secret",
                       LEGACY_SALT)
        return settings
    path = secret_path(settings)
    settings.key_salt = load_or_create(path, settings.database_url)
    if is_cluster_config(settings):
        _warn_once(("file", str(path.resolve())),
                   "no key_salt configured for this cluster configuration: using the secret in "
                   "%s on this machine. Set RAYHORDE_KEY_SALT on every node (and where `rayhorde "
                   "users` runs) so that API keys keep working whichever node builds the "
                   "application", path.resolve())
    return settings


def load_or_create(path: Path, database_url: str) -> str:
    """The secret in `path`, made there first if there is none. Concurrent first starts agree:
    the file appears whole (written aside, then linked into place) and only once."""
    existing = _read(path)
    if existing is not None:
        return existing
    if _has_keyed_users(database_url):
        secret = LEGACY_SALT
        log.warning("this database's API keys were hashed with the public default salt; keeping "
                    "it (in %s) so they keep working. Set RAYHORDE_KEY_SALT and issue new keys "
                    "to leave it behind", path)
    else:
        secret = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".secret-")  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:  # another process made it first: theirs counts
            return _read(path) or secret
    finally:
        os.unlink(tmp)
    log.info("made the installation secret in %s", path)
    return secret


def _read(path: Path) -> str | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        _warn_once(("mode", str(path)), "%s is readable by others (mode %o): chmod 600 it",
                   path, mode)
    if not text:
        raise RuntimeError(f"{path} is empty: delete it to make a new secret, or set "
                           "RAYHORDE_KEY_SALT")
    return text


def _has_keyed_users(database_url: str) -> bool:
    """Whether a SQLite database already holds users with API keys (64-digit hashes; the
    anonymous and horde accounts hold short markers). Read-only: no file is created."""
    db_file = sqlite_path(database_url)
    if db_file is None or not db_file.is_file():
        return False
    try:
        with sqlite3.connect(f"file:{db_file}?mode=ro", uri=True) as conn:
            return conn.execute("SELECT 1 FROM users WHERE length(api_key_hash) = 64 LIMIT 1"
                                ).fetchone() is not None
    except sqlite3.Error:  # no users table yet: a new database
        return False


def digest(value) -> str:
    """A short fingerprint of a setting's value (never the value itself)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_env_digests(settings) -> None:
    for name, expected in settings.env_digests.items():
        if digest(getattr(settings, name, None)) != expected:
            raise ValueError(
                f"{name}: this process read a different RAYHORDE_{name.upper()} from its "
                "environment than the application was built with: set it alike on every node "
                "(the environment of `ray start`) or in the application's runtime_env")
