"""The volunteer's side of the node proof (api/node_keys.py): the node's key on disk, and the
signer the bridge runs on the node as a Ray task.

`rayhorde join` derives the node key from the owner's API key and writes it under the
volunteer's config directory ($RAYHORDE_CONFIG_DIR, default ~/.config/rayhorde/node_key.pem,
mode 600), then starts the node's raylet with RAYHORDE_NODE_KEY_FILE naming the file; the
node's Ray workers inherit it, so the signer finds the key there. Neither the API key nor the
private key leaves the machine: only signatures of challenges do.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from api import node_keys

KEY_FILE_ENV = "RAYHORDE_NODE_KEY_FILE"


def default_key_file() -> Path:
    base = os.environ.get("RAYHORDE_CONFIG_DIR") or Path.home() / ".config" / "rayhorde"
    return Path(base) / "node_key.pem"


def load_key(path: Path) -> Ed25519PrivateKey:
    key = load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def write_key(path: Path, key: Ed25519PrivateKey) -> None:
    """Keep `key` in `path`, readable by its owner only (replacing what was there)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    part = path.with_name(path.name + ".part")
    part.unlink(missing_ok=True)
    # Created 600 (not chmod after): no moment in which others may read it.
    with os.fdopen(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
        f.write(pem)
    part.replace(path)


def sign_on_node(challenge: bytes) -> str:
    """Run on the challenged node (a Ray task pinned to it): sign with the node's key."""
    import ray

    path = os.environ.get(KEY_FILE_ENV)
    if not path:
        raise RuntimeError(f"this node has no key ({KEY_FILE_ENV} is not set)")
    return node_keys.sign(load_key(Path(path)), challenge, ray.get_runtime_context().get_node_id())
