"""Certificates and keys for the local control plane, generated with `cryptography`.

Why it exists: a real kube-apiserver with RBAC needs a CA, a serving certificate, client certificates whose
subject carries the user and groups, and a service-account signing key. Generating them in-process keeps the
control plane free of openssl/cfssl as dependencies and makes every run's PKI fresh and throwaway.

The same CA serves the TLS probe tests (tests of beacon's verified HTTPS and gRPC checks, and their benchmark):
a CA of another name stands for an unknown authority, `issue(expired=True)` for an expired certificate. Every
certificate carries its key identifiers (subject and authority), so a CA of the same name but another key is told
apart from the real one by OpenSSL's issuer lookup ("unable to get local issuer", not "bad signature").
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALIDITY = dt.timedelta(days=30)


@dataclass(frozen=True)
class KeyPair:
    """PEM files of one certificate and its private key."""

    cert: Path
    key: Path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def _key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class Pki:
    """A throwaway certificate authority in one directory, issuing the control plane's certificates."""

    def __init__(self, *, directory: Path, name: str = "beacon-dev-ca") -> None:
        """`name`: the CA's common name (a second CA of another name is an authority the first one's clients do
        not know)."""
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
        self._ca_key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self._ca_name = subject
        self._ca_cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._now)
            .not_valid_after(self._now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._ca_key.public_key()), critical=False)
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
            .sign(self._ca_key, hashes.SHA256())
        )
        self.ca = KeyPair(
            cert=_write(directory / "ca.crt", self._ca_cert.public_bytes(serialization.Encoding.PEM)),
            key=_write(directory / "ca.key", _key_pem(self._ca_key)),
        )

    def issue(
        self,
        *,
        name: str,
        common_name: str,
        organizations: tuple[str, ...] = (),
        server_hosts: tuple[str, ...] = (),
        client: bool = False,
        expired: bool = False,
    ) -> KeyPair:
        """Issue a leaf certificate: serving (with `server_hosts` as SANs), client (CN=user, O=groups), or both.
        `expired`: valid from two days ago until yesterday."""
        key = ec.generate_private_key(ec.SECP256R1())
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
        attrs += [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org) for org in organizations]
        usages = []
        if server_hosts:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attrs))
            .issuer_name(self._ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._now - dt.timedelta(days=2) if expired else self._now)
            .not_valid_after(self._now - dt.timedelta(days=1) if expired else self._now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._ca_key.public_key()), critical=False
            )
        )
        if server_hosts:
            sans: list[x509.GeneralName] = []
            for host in server_hosts:
                try:
                    sans.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    sans.append(x509.DNSName(host))
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self._ca_key, hashes.SHA256())
        return KeyPair(
            cert=_write(self.directory / f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM)),
            key=_write(self.directory / f"{name}.key", _key_pem(key)),
        )

    def service_account_keys(self) -> KeyPair:
        """An RSA key pair for signing service-account tokens (the `cert` path holds the PEM public key)."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return KeyPair(
            cert=_write(self.directory / "sa.pub", public),
            key=_write(self.directory / "sa.key", _key_pem(key)),
        )
