"""Key material: generating a key and reading one out of a Secret. Never logged."""

from __future__ import annotations

import base64
import binascii
import secrets
import string
from typing import Any

from .settings import API_VERSION, MANAGED_BY, MANAGED_BY_LABEL, OWNER_LABEL, SECRET_DATA_KEY

KEY_PREFIX = "sk-atlas-"
BASE62 = string.digits + string.ascii_letters
RANDOM_CHARS = 32  # 32 * log2(62) = 190 bits
MIN_LENGTH, MAX_LENGTH = 8, 512


def generate_api_key() -> str:
    return KEY_PREFIX + "".join(secrets.choice(BASE62) for _ in range(RANDOM_CHARS))


def default_secret_name(atlaskey_name: str) -> str:
    return f"{atlaskey_name}-api-key"


def secret_name_of(name: str, spec: dict[str, Any]) -> str:
    return spec.get("secretName") or default_secret_name(name)


def generated_secret(namespace: str, secret_name: str, owner: dict[str, Any]) -> dict[str, Any]:
    """A Secret holding a fresh key, owned by the AtlasKey (deleted with it by the GC)."""
    meta = owner["metadata"]
    encoded = base64.b64encode(generate_api_key().encode()).decode()
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": secret_name,
            "namespace": namespace,
            "labels": {MANAGED_BY_LABEL: MANAGED_BY, OWNER_LABEL: meta["name"]},
            "ownerReferences": [
                {
                    "apiVersion": API_VERSION,
                    "kind": "AtlasKey",
                    "name": meta["name"],
                    "uid": meta["uid"],
                    "controller": True,
                }
            ],
        },
        "data": {SECRET_DATA_KEY: encoded},
    }


def read_api_key(secret: dict[str, Any] | None) -> tuple[str | None, str]:
    """(key, "") when the Secret holds a usable key, else (None, why not)."""
    if secret is None:
        return None, "the Secret does not exist"
    data = secret.get("data") or {}
    string_data = secret.get("stringData") or {}
    if SECRET_DATA_KEY in data and data[SECRET_DATA_KEY] is not None:
        try:
            value = base64.b64decode(data[SECRET_DATA_KEY], validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return None, f"data key {SECRET_DATA_KEY!r} is not valid base64-encoded UTF-8"
    elif SECRET_DATA_KEY in string_data:
        value = str(string_data[SECRET_DATA_KEY])
    else:
        return None, f"the Secret has no data key {SECRET_DATA_KEY!r}"
    # A trailing newline from `echo ... | kubectl create secret` is not part of the key: an HTTP
    # header cannot carry it, so the key a client sends is the stripped value.
    value = value.strip()
    if not MIN_LENGTH <= len(value) <= MAX_LENGTH:
        return None, f"data key {SECRET_DATA_KEY!r} must hold {MIN_LENGTH}-{MAX_LENGTH} characters"
    if any(not (33 <= ord(ch) <= 126) for ch in value):
        return None, f"data key {SECRET_DATA_KEY!r} must be printable ASCII without spaces"
    return value, ""
