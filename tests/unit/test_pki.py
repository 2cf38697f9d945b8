"""The throwaway PKI issues what kube-apiserver needs: a CA, serving SANs, and client subjects carrying groups."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from beacon_dev.devcluster.pki import Pki


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_serving_certificate_has_ip_and_dns_sans_and_chains_to_ca(tmp_path: Path) -> None:
    pki = Pki(directory=tmp_path)
    pair = pki.issue(name="srv", common_name="kube-apiserver", server_hosts=("127.0.0.1", "kubernetes.default"))
    cert = _load(pair.cert)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert sans.get_values_for_type(x509.DNSName) == ["kubernetes.default"]
    cert.verify_directly_issued_by(_load(pki.ca.cert))
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_client_certificate_carries_user_and_groups(tmp_path: Path) -> None:
    pki = Pki(directory=tmp_path)
    cert = _load(pki.issue(name="admin", common_name="alice", organizations=("system:masters",), client=True).cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alice"
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)] == ["system:masters"]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_keys_are_private_files(tmp_path: Path) -> None:
    pki = Pki(directory=tmp_path)
    sa = pki.service_account_keys()
    assert sa.cert.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    for path in (pki.ca.key, sa.key):
        assert path.stat().st_mode & 0o077 == 0
