"""Node keys: how a Ray-joined volunteer node proves whose it is (cluster/bridge.py).

A node's labels are visible to every member of the cluster, so a label naming an owner proves
nothing: anyone could copy it. Instead each user has an Ed25519 node key derived from their API
key (HKDF-SHA256: the key pair follows from the API key, the API key not from it). The server
stores its public half (`users.node_public_key`): when `rayhorde users create` makes the user,
or on `PUT /api/v2/node_key` with the API key (after a key change, or for older users).
`rayhorde join` derives the private half on the volunteer's machine and keeps it in a file
there (the API key itself goes nowhere); the node carries the public key as a label, and the
bridge sends the node a fresh challenge naming the node, which only a holder of the private
key can sign. The signature is checked against the key the server stored for a user, never
against anything the node says.

Keys and signatures travel as unpadded base64url: 43 characters for a public key (a Ray
label value holds at most 63), 86 for a signature. Ed25519 through `cryptography`.
"""

from __future__ import annotations

import base64
import binascii
import secrets

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

PUBLIC_KEY_CHARS = 43  # 32 bytes
SIGNATURE_CHARS = 86  # 64 bytes
# In every challenge: a signature made for this purpose cannot be replayed as anything else.
DOMAIN = b"rayhorde-node-proof-v1"
MAX_CHALLENGE_BYTES = 256


def _encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _decode(text: str, length: int) -> bytes:
    if not isinstance(text, str) or len(text) != length:
        raise ValueError(f"want {length} characters of unpadded base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("not base64url") from None


def node_private_key(api_key: str) -> Ed25519PrivateKey:
    """The node key of the user with `api_key` (API keys carry 128 random bits)."""
    seed = HKDF(algorithm=SHA256(), length=32, salt=None,
                info=b"rayhorde-node-key-v1").derive(api_key.encode())
    return Ed25519PrivateKey.from_private_bytes(seed)


def node_public_key(api_key: str) -> str:
    """What `users.node_public_key` holds for the user with `api_key`."""
    return public_key_text(node_private_key(api_key))


def public_key_text(private: Ed25519PrivateKey) -> str:
    return _encode(private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))


def parse_public_key(text: str) -> Ed25519PublicKey:
    """The public key `text` names; ValueError when it is not one."""
    return Ed25519PublicKey.from_public_bytes(_decode(text, PUBLIC_KEY_CHARS))


def new_challenge(node_id: str) -> bytes:
    """What the bridge asks a node to sign: the purpose, the node's id, a fresh nonce."""
    return b"\n".join([DOMAIN, node_id.encode(), secrets.token_hex(32).encode()])


def challenged_node(challenge: bytes) -> str:
    """The node id a challenge names; ValueError when it is no challenge of ours."""
    parts = challenge.split(b"\n") if len(challenge) <= MAX_CHALLENGE_BYTES else []
    if len(parts) != 3 or parts[0] != DOMAIN or not parts[1] or len(parts[2]) != 64:
        raise ValueError("not a rayhorde node challenge")
    return parts[1].decode()


def sign(private: Ed25519PrivateKey, challenge: bytes, own_node_id: str) -> str:
    """The node's answer. Only a challenge naming this node is signed: another node cannot
    relay its own challenge here and pass the answer off as its own."""
    if challenged_node(challenge) != own_node_id:
        raise ValueError("the challenge names another node")
    return _encode(private.sign(challenge))


def verify(public_key: str, challenge: bytes, signature: str) -> bool:
    """Whether `signature` is `public_key`'s over `challenge`."""
    try:
        parse_public_key(public_key).verify(_decode(signature, SIGNATURE_CHARS), challenge)
    except (ValueError, InvalidSignature, TypeError):
        return False
    return True
