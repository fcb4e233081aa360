"""`rayhorde users create NAME` prints a new API key that authenticates, stored only hashed."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from sqlalchemy import select

from api.db.models import User

pytestmark = pytest.mark.timeout(120)


def test_users_create_prints_a_working_key(db, client, tmp_path):
    env = {**os.environ, "RAYHORDE_DATABASE_URL": db.url}
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "users", "create", "bob"],
                         env=env, capture_output=True, text=True, check=True).stdout
    key = re.search(r"API key: (\S+)", out).group(1)
    assert len(key) >= 20
    with db.read() as s:
        stored = s.execute(select(User).where(User.username == "bob")).scalar_one()
        assert key not in stored.api_key_hash and len(stored.api_key_hash) == 64
    me = client.get("/api/v2/find_user", headers={"apikey": key}).json()
    assert me["username"] == f"bob#{stored.id}"


def test_new_api_keys_never_look_like_command_line_options():
    from api.auth import new_api_key

    keys = [new_api_key() for _ in range(3000)]  # 1 in 64 would start with "-" by chance
    assert len(set(keys)) == 3000 and all(len(k) == 22 for k in keys)
    assert not [k for k in keys if k.startswith("-")]
