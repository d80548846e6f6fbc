"""Atlas's Kubernetes API as its clients name it: the group, version, plurals and kinds, and the
layout of a key's Secret (data key, labels, default name, generated key format).

The operator and the `kubectl atlas` plugin both read and write these objects; this module is
the one place their names are written down (the CRDs in crds/ are the schema).
"""

from __future__ import annotations

import base64
import binascii
import secrets
import string
from typing import Any

GROUP = "atlas.bugvanquisher.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KEYS = "atlaskeys"
QUOTAS = "atlasquotas"
PRICE_LISTS = "atlaspricelists"
KIND_OF = {KEYS: "AtlasKey", QUOTAS: "AtlasQuota", PRICE_LISTS: "AtlasPriceList"}

# A key's Secret: the key is under this data key; the operator lists and watches only Secrets
# labelled OWNER_LABEL=<AtlasKey name> (generated ones carry it, user-supplied ones need it).
SECRET_DATA_KEY = "api-key"
OWNER_LABEL = f"{GROUP}/atlaskey"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "atlas-operator"

KEY_PREFIX = "sk-atlas-"
BASE62 = string.digits + string.ascii_letters
RANDOM_CHARS = 32  # 32 * log2(62) = 190 bits
MIN_LENGTH, MAX_LENGTH = 8, 512  # of a usable key (user-supplied ones too)


def generate_api_key() -> str:
    return KEY_PREFIX + "".join(secrets.choice(BASE62) for _ in range(RANDOM_CHARS))


def default_secret_name(atlaskey_name: str) -> str:
    return f"{atlaskey_name}-api-key"


def secret_name_of(name: str, spec: dict[str, Any]) -> str:
    """The Secret an AtlasKey named ``name`` with this ``spec`` reads its key from."""
    return spec.get("secretName") or default_secret_name(name)


def read_api_key(secret: dict[str, Any] | None) -> tuple[str | None, str]:
    """(key, "") when the Secret holds a usable key, else (None, why not). Never log the key."""
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
