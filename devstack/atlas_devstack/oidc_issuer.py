"""A real OpenID Connect issuer for the tiers that test User and Group subjects: PyPI's
``oidc-provider-mock`` (an authlib-based provider nobody here wrote), served over HTTPS by
uvicorn with a CA of its own, so that the operator fetches its discovery and JWKS exactly as it
would a company's issuer (``certificateAuthority`` included).

Tokens are ID tokens from the authorization-code flow, as a command-line login would get them:
:meth:`OidcIssuerProcess.id_token` sets the user's claims (email, groups), authorises the client
``atlas`` (so ``aud`` is ``atlas``) and exchanges the code. The issuer signs with RS256.

``python -m atlas_devstack.oidc_issuer --port P --cert C --key K`` serves until a signal.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import timedelta
from pathlib import Path
from typing import Any

from . import processes

CLIENT_ID = "atlas"  # the client whose ID tokens Atlas accepts: their audience
REDIRECT_URI = "http://127.0.0.1/callback"  # never followed: the code is read off the redirect


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class OidcIssuer:
    """A running issuer, as its clients see it: its URL, the CA its certificate is signed by,
    its ``ATLAS_JWT_ISSUERS`` entry, and ID tokens for users it is told about."""

    def __init__(self, url: str, ca_file: str | Path) -> None:
        self.url = url  # exactly its tokens' ``iss`` (and its discovery's ``issuer``)
        self.ca_file = Path(ca_file)

    @property
    def ca_pem(self) -> str:
        return self.ca_file.read_text()

    def jwt_config(self, **claim_mappings: Any) -> dict[str, Any]:
        """This issuer as an ``ATLAS_JWT_ISSUERS`` entry (the chart's ``workloadIdentity.jwt``)."""
        return {
            "issuer": {"url": self.url, "audiences": [CLIENT_ID], "certificateAuthority": self.ca_pem},
            "claimMappings": claim_mappings
            or {"username": {"claim": "email", "prefix": ""}, "groups": {"claim": "groups", "prefix": ""}},
        }

    def ready(self) -> bool:
        try:
            return self._get("/.well-known/openid-configuration").get("issuer") == self.url
        except OSError:
            return False

    def _context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def _open(self, request: urllib.request.Request) -> Any:
        opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=self._context()), _NoRedirect)
        try:
            return opener.open(request, timeout=10)
        except urllib.error.HTTPError as exc:
            if exc.code in (301, 302, 303, 307):
                return exc  # the authorization response: a redirect to the client
            raise

    def _get(self, path: str) -> dict[str, Any]:
        with self._open(urllib.request.Request(self.url + path)) as response:
            return json.loads(response.read())

    def id_token(self, subject: str, claims: dict[str, Any] | None = None, *, client_id: str = CLIENT_ID) -> str:
        """An ID token for user ``subject`` with ``claims`` (e.g. email, groups), audience ``client_id``."""
        put = urllib.request.Request(
            f"{self.url}/users/{urllib.parse.quote(subject)}",
            method="PUT",
            data=json.dumps(claims or {}).encode(),
            headers={"content-type": "application/json"},
        )
        self._open(put).close()
        query = urllib.parse.urlencode(
            {
                "client_id": client_id,
                "redirect_uri": REDIRECT_URI,
                "response_type": "code",
                "scope": "openid email profile",
                "state": "s",
            }
        )
        authorize = urllib.request.Request(
            f"{self.url}/oauth2/authorize?{query}",
            method="POST",
            data=urllib.parse.urlencode({"sub": subject}).encode(),
        )
        redirect = self._open(authorize)
        location = redirect.headers.get("location") or ""
        code = urllib.parse.parse_qs(urllib.parse.urlparse(location).query).get("code")
        if not code:
            raise RuntimeError(f"the OIDC issuer authorised no code (redirect {location!r})")
        token = urllib.request.Request(
            f"{self.url}/oauth2/token",
            method="POST",
            data=urllib.parse.urlencode(
                {
                    "grant_type": "authorization_code",
                    "code": code[0],
                    "redirect_uri": REDIRECT_URI,
                    "client_id": client_id,
                    "client_secret": "any",
                }
            ).encode(),
        )
        with self._open(token) as response:
            return json.loads(response.read())["id_token"]


def tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """(CA, certificate, key) of an issuer serving from ``directory`` (created on first use)."""
    from .controlplane import serving_tls

    paths = (directory / "oidc-issuer-ca.crt", directory / "oidc-issuer.crt", directory / "oidc-issuer.key")
    if not all(p.exists() for p in paths):
        serving_tls(directory, "oidc-issuer")
    return paths


def command(port: int, cert: Path, key: Path, token_max_age: int = 3600) -> list[str]:
    return [
        sys.executable,
        "-m",
        "atlas_devstack.oidc_issuer",
        "--port",
        str(port),
        "--cert",
        str(cert),
        "--key",
        str(key),
        "--token-max-age",
        str(token_max_age),
    ]


class OidcIssuerProcess(OidcIssuer):
    """The issuer as a child process on a free loopback port, HTTPS with its own CA (tests)."""

    def __init__(self, *, port: int | None = None, token_max_age: int = 3600, log_path: str | None = None) -> None:
        from .controlplane import free_port

        self.port = port or free_port()
        self.token_max_age = token_max_age
        self.log_path = log_path
        self._tmp: tempfile.TemporaryDirectory | None = tempfile.TemporaryDirectory(prefix="atlas-oidc-")
        self.ca, self.cert, self.key = tls_files(Path(self._tmp.name))
        super().__init__(f"https://127.0.0.1:{self.port}", self.ca)
        self._proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> "OidcIssuerProcess":
        # the child holds its own descriptor of the log: the parent's is closed once it started
        with open(self.log_path, "ab") if self.log_path else contextlib.nullcontext(subprocess.DEVNULL) as out:
            self._proc = subprocess.Popen(
                command(self.port, self.cert, self.key, self.token_max_age),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self._proc.poll() is not None:
                raise RuntimeError(f"the OIDC issuer exited with {self._proc.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError("the OIDC issuer did not become ready")
            time.sleep(0.05)  # polling a port: there is nothing to wait on instead
        return self

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        processes.stop_process(proc)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "OidcIssuerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    import uvicorn
    from oidc_provider_mock import app

    parser = argparse.ArgumentParser(description="OpenID Connect issuer for tests (oidc-provider-mock over HTTPS)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--token-max-age", type=int, default=3600)
    args = parser.parse_args(argv)
    uvicorn.run(
        app(access_token_max_age=timedelta(seconds=args.token_max_age)),
        interface="wsgi",
        host=args.host,
        port=args.port,
        ssl_certfile=args.cert,
        ssl_keyfile=args.key,
        log_level="warning",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
