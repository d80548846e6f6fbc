"""The operator names its kopf identity without the passwd database: the image runs as a bare
numeric UID (10001) that has no passwd entry, where `getpass.getuser()` raises KeyError."""

from __future__ import annotations

import getpass
import os
import socket

from atlas_operator.__main__ import own_identity


def test_identity_needs_no_passwd_entry(monkeypatch):
    def no_passwd_entry() -> str:
        raise KeyError("getpwuid(): uid not found: 10001")

    monkeypatch.setattr(getpass, "getuser", no_passwd_entry)
    for name in ("LOGNAME", "USER", "LNAME", "USERNAME"):
        monkeypatch.delenv(name, raising=False)
    identity = own_identity()
    # In a pod the hostname is the pod's name: the identity says which pod this is.
    assert identity == f"atlas-operator@{socket.gethostname()}/{os.getpid()}"


def test_main_hands_kopf_the_identity(monkeypatch):
    """kopf falls back to `getpass.getuser()` whenever run() gets no identity (and no POD_ID)."""
    import kopf

    from atlas_operator import __main__ as entry

    seen: dict = {}
    monkeypatch.setattr(kopf, "run", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(kopf, "configure", lambda **kwargs: None)
    monkeypatch.setattr(getpass, "getuser", lambda: (_ for _ in ()).throw(KeyError("no passwd entry")))
    entry.main()
    assert seen["identity"].startswith("atlas-operator@") and seen["standalone"] is True
