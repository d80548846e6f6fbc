"""External Redis with TLS (``rediss://``), as the Helm chart configures it: a real
``redis-server`` listening only on a TLS port with a password, certificates from a throw-away
CA generated here. Both Redis clients of the gateway (the hot-path FastRedis and redis-py for
config reads) must use the same URL, query parameters included."""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from atlas_core import contract
from atlas_devstack.processes import stop_process
from atlas_devstack.redis_server import free_port, redis_server_binary
from atlas_devstack.waiting import wait_for
from atlas_gateway.auth.principal import Principal
from atlas_gateway.ledger.admission import Admission
from atlas_gateway.store.fastredis import FastRedis
from tests.fixtures.gateway import write_key

PASSWORD = "s3cr/et:pw"  # characters that must survive URL quoting
BODY = {"model": "llama-3.1-8b-instruct", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def _write_pki(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it (PEM files)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "atlas-test-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "redis.test")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("redis.test"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    ca_path, cert_path, key_path = directory / "ca.crt", directory / "server.crt", directory / "server.key"
    ca_path.write_bytes(ca.public_bytes(pem))
    cert_path.write_bytes(cert.public_bytes(pem))
    key_path.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())
    )
    return ca_path, cert_path, key_path


def _tls_supported(binary: str) -> bool:
    """Debian builds redis-server with TLS; a build without it rejects the tls-* directives."""
    out = subprocess.run([binary, "--port", "0", "--tls-port", "0"], capture_output=True, text=True, timeout=10)
    return "Bad directive" not in (out.stdout + out.stderr)


@pytest.fixture(scope="module")
def tls_redis():
    """``(url, ca path)`` of a password-protected redis-server reachable only over TLS."""
    binary = redis_server_binary()
    if binary is None:
        pytest.skip("redis-server not installed: run `make system-deps`")
    if not _tls_supported(binary):
        pytest.skip("this redis-server build has no TLS support")
    with tempfile.TemporaryDirectory(prefix="atlas-redis-tls-") as tmp:
        ca, cert, key = _write_pki(Path(tmp))
        port = free_port()
        proc = subprocess.Popen(
            [
                binary,
                "--bind",
                "127.0.0.1",
                "--port",
                "0",
                "--tls-port",
                str(port),
                "--tls-cert-file",
                str(cert),
                "--tls-key-file",
                str(key),
                "--tls-ca-cert-file",
                str(ca),
                "--tls-auth-clients",
                "no",
                "--requirepass",
                PASSWORD,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                tmp,
                "--logfile",
                str(Path(tmp) / "redis.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        # exactly the chart's shape (charts/atlas/templates/_helpers.tpl, atlas.redis.env)
        url = (
            f"rediss://default:{quote(PASSWORD, safe='')}@127.0.0.1:{port}/0?ssl_ca_certs={ca}&ssl_check_hostname=false"
        )
        try:

            def answers() -> bool:
                if proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited: {(Path(tmp) / 'redis.log').read_text()}")
                client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
                try:
                    return client.ping()
                except redis.RedisError:
                    return False
                finally:
                    client.close()

            wait_for("TLS redis-server", answers, 10)
            yield url, ca
        finally:
            stop_process(proc)


async def test_fast_client_admits_and_settles_over_tls(tls_redis):
    url, ca = tls_redis
    limits = contract.Limits(tokens_per_day=1000, max_concurrent=1)
    p = Principal(contract.KeyConfig("team", "tls-fast", "0123abcd", limits), None)
    fast = FastRedis(url)
    try:
        assert fast.ssl is not None
        admission = Admission(lease_ttl_seconds=60, fast=fast)
        first = await admission.admit(p, "req-1", 100)
        assert first.admitted
        assert not (await admission.admit(p, "req-2", 100)).admitted  # maxConcurrent=1 holds over TLS
        assert await admission.settle(p, "req-1", 100, 40) == 1
        assert (await admission.admit(p, "req-3", 100)).admitted
    finally:
        await fast.aclose()


async def test_fast_client_verifies_the_server_certificate(tls_redis):
    url, _ = tls_redis
    # without the CA (system trust store only) the handshake must fail, not silently pass
    fast = FastRedis(url.split("?")[0], timeout=2)
    try:
        with pytest.raises(OSError):  # ssl.SSLCertVerificationError is an OSError
            await fast.execute(b"PING")
    finally:
        await fast.aclose()
    # the wrong password is refused by Redis
    wrong = FastRedis(url.replace(quote(PASSWORD, safe=""), "nope"), timeout=2)
    try:
        with pytest.raises(Exception, match="WRONGPASS|invalid"):
            await wrong.execute(b"PING")
    finally:
        await wrong.aclose()


def test_gateway_over_rediss_admits_and_bills(tls_redis, mock_upstream, start_gateway):
    url, _ = tls_redis
    write_key(url, "sk-tls", "tls", contract.Limits(tokens_per_day=10_000))
    gw = start_gateway(url, mock_upstream.url)
    reply = httpx.post(
        gw.url + "/v1/chat/completions", json=BODY, headers={"Authorization": "Bearer sk-tls"}, timeout=10
    )
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-ratelimit-limit-tokens"] == "10000"
    assert httpx.get(gw.url + "/readyz", timeout=5).status_code == 200  # redis-py over TLS too
    billed = reply.json()["usage"]["total_tokens"]
    subject = contract.key_subject("team", "tls")

    def settled() -> int:
        usage = httpx.get(gw.url + "/v1/usage", headers={"x-api-key": "sk-tls"}, timeout=5).json()
        return usage["usage"]["tokensToday"]

    assert wait_for("settlement over TLS", lambda: settled() == billed, 10) is True
    client = redis.Redis.from_url(url)
    try:
        assert client.zcard(contract.lease_key(subject)) == 0  # the lease was released
    finally:
        client.close()
