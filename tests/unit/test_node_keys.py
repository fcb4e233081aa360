"""The node proof without Ray (api/node_keys.py, cluster/node_proof.py) and the route that
stores a user's node key (PUT /api/v2/node_key)."""

from __future__ import annotations

import stat

import pytest
from sqlalchemy import select

from api import node_keys
from api.auth import hash_api_key
from api.db.models import User
from cluster.node_proof import load_key, write_key

KEY = "owner-api-key-00000000"
NODE = "a" * 56


def test_a_signature_verifies_only_with_its_key_over_its_challenge():
    private = node_keys.node_private_key(KEY)
    public = node_keys.node_public_key(KEY)
    assert len(public) == node_keys.PUBLIC_KEY_CHARS <= 63  # fits a Ray label value
    challenge = node_keys.new_challenge(NODE)
    signature = node_keys.sign(private, challenge, NODE)
    assert node_keys.verify(public, challenge, signature)
    # Another key, another challenge, a changed signature: all fail.
    assert not node_keys.verify(node_keys.node_public_key("someone-else-key-0000"), challenge,
                                signature)
    assert not node_keys.verify(public, node_keys.new_challenge(NODE), signature)
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    assert not node_keys.verify(public, challenge, flipped)
    for bad in ("", "x" * 86, signature[:-1], None):
        assert not node_keys.verify(public, challenge, bad)
    assert not node_keys.verify("not-a-key", challenge, signature)


def test_keys_follow_from_the_api_key_alone():
    assert node_keys.node_public_key(KEY) == node_keys.node_public_key(KEY)
    assert node_keys.node_public_key(KEY) != node_keys.node_public_key(KEY + "x")
    assert KEY not in node_keys.node_public_key(KEY)


def test_a_node_signs_only_challenges_naming_itself():
    private = node_keys.node_private_key(KEY)
    with pytest.raises(ValueError, match="another node"):  # relayed from another node
        node_keys.sign(private, node_keys.new_challenge("b" * 56), NODE)
    for junk in (b"", b"sign me", b"\n".join([b"other-purpose", NODE.encode(), b"0" * 64]),
                 node_keys.new_challenge(NODE) + b"x" * 300):
        with pytest.raises(ValueError):
            node_keys.sign(private, junk, NODE)


def test_the_key_file_is_the_owners_alone(tmp_path):
    path = tmp_path / "conf" / "node_key.pem"
    write_key(path, node_keys.node_private_key(KEY))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert node_keys.public_key_text(load_key(path)) == node_keys.node_public_key(KEY)
    assert KEY.encode() not in path.read_bytes()
    write_key(path, node_keys.node_private_key("second-key-0000000000"))  # replaced
    assert node_keys.public_key_text(load_key(path)) == node_keys.node_public_key(
        "second-key-0000000000")


def test_put_node_key_stores_the_callers_key(client, ctx):
    with ctx.db.write() as s:
        s.add(User(username="vol", api_key_hash=hash_api_key(KEY, ctx.settings.key_salt)))
    r = client.put("/api/v2/node_key", headers={"apikey": KEY})
    assert r.status_code == 200, r.text
    assert r.json() == {"node_public_key": node_keys.node_public_key(KEY)}
    assert client.put("/api/v2/node_key", headers={"apikey": KEY}).status_code == 200  # again
    with ctx.db.read() as s:
        stored = s.execute(select(User.node_public_key).where(User.username == "vol")).scalar_one()
    assert stored == node_keys.node_public_key(KEY)
    assert client.put("/api/v2/node_key").status_code == 403  # no key: the anonymous user
    assert client.put("/api/v2/node_key", headers={"apikey": "wrong-key-000000000000"}
                      ).status_code == 401
    anon = client.put("/api/v2/node_key", headers={"apikey": "0000000000"})
    assert anon.status_code == 403 and "apikey" in anon.json()["message"]
