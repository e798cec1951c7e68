"""DICOM TLS (PS3.15 Annex B, BCP 195): :class:`ssl.SSLContext` builders for pynetdicom.

* :func:`server_context` for the listener (``settings.node.tls``): the server certificate and
  key, and with ``verify_client`` a required client certificate checked against
  ``ca_certificates``. Pass it to ``AE.start_server(..., ssl_context=ctx)``.
* :func:`client_context` for a ``dimse`` destination with ``tls: true``: the peer is verified
  against ``tls_ca_certificates`` (or the system store); a client certificate is presented when
  ``tls_certificate``/``tls_private_key`` are set. Pass it to
  ``AE.associate(..., tls_args=client_tls_args(dest))``.

Both refuse TLS below 1.2. Host-name checking is off for DICOM peers by default: PACS and
modality certificates rarely name the address they are reached by; the chain is verified. Turn
it on with ``check_hostname=True``.

:func:`make_test_pki` writes a throw-away CA, server and client certificate (tests, the demo).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from dicom_node.config import DimseDestination, TLSConfig

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
"""Oldest TLS version accepted either way (BCP 195)."""


class TLSConfigError(ValueError):
    """A TLS setting is missing or a certificate/key file cannot be used; names the key path."""


def _need(path: Path | None, key: str) -> Path:
    if path is None:
        raise TLSConfigError(f"{key}: required for DICOM TLS")
    if not Path(path).is_file():
        raise TLSConfigError(f"{key}: no such file: {path}")
    return Path(path)


def server_context(tls: TLSConfig) -> ssl.SSLContext:
    """The listener's TLS context from ``settings.node.tls``.

    Args:
        tls: The ``node.tls`` section; ``certificate`` and ``private_key`` are required,
            ``ca_certificates`` too when ``verify_client`` is on.

    Raises:
        TLSConfigError: A file is missing or is not a usable PEM certificate/key.
    """
    cert = _need(tls.certificate, "node.tls.certificate")
    key = _need(tls.private_key, "node.tls.private_key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MINIMUM_VERSION
    try:
        ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except (ssl.SSLError, OSError) as err:
        raise TLSConfigError(f"node.tls.certificate/private_key: unusable: {err}") from None
    if tls.verify_client:
        ca = _need(tls.ca_certificates, "node.tls.ca_certificates")
        _load_ca(ctx, ca, "node.tls.ca_certificates")
        ctx.verify_mode = ssl.CERT_REQUIRED
    elif tls.ca_certificates is not None:
        # Client certificates are checked when offered, not required.
        _load_ca(ctx, _need(tls.ca_certificates, "node.tls.ca_certificates"),
                 "node.tls.ca_certificates")
        ctx.verify_mode = ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_context(dest: DimseDestination, *, check_hostname: bool = False) -> ssl.SSLContext:
    """TLS context to call a ``dimse`` destination.

    Args:
        dest: The destination; ``tls_ca_certificates`` verifies the peer (system store when
            ``None``); ``tls_certificate`` + ``tls_private_key`` are presented when set.
        check_hostname: Also require the peer certificate to name ``dest.host``.

    Raises:
        TLSConfigError: A file is missing or unusable, or only one of certificate/key is set.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = MINIMUM_VERSION
    ctx.check_hostname = check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    if dest.tls_ca_certificates is not None:
        _load_ca(ctx, _need(dest.tls_ca_certificates, "tls_ca_certificates"),
                 "tls_ca_certificates")
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if (dest.tls_certificate is None) != (dest.tls_private_key is None):
        raise TLSConfigError("tls_certificate/tls_private_key: set both or neither")
    if dest.tls_certificate is not None and dest.tls_private_key is not None:
        cert = _need(dest.tls_certificate, "tls_certificate")
        key = _need(dest.tls_private_key, "tls_private_key")
        try:
            ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
        except (ssl.SSLError, OSError) as err:
            raise TLSConfigError(f"tls_certificate/tls_private_key: unusable: {err}") from None
    return ctx


def client_tls_args(dest: DimseDestination) -> tuple[ssl.SSLContext, str] | None:
    """``tls_args`` for ``AE.associate`` (``None`` when the destination is plain TCP).

    The server host name is ``dest.host`` (sent as SNI when it is a name, not an address).
    """
    if not dest.tls:
        return None
    return client_context(dest), dest.host


def _load_ca(ctx: ssl.SSLContext, path: Path, key: str) -> None:
    try:
        ctx.load_verify_locations(cafile=str(path))
    except (ssl.SSLError, OSError) as err:
        raise TLSConfigError(f"{key}: unusable CA bundle: {err}") from None


@dataclass(frozen=True)
class TestPKI:
    """Paths of a throw-away PKI written by :func:`make_test_pki` (all PEM)."""

    __test__ = False  # not a pytest test class

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_cert: Path
    """A second, unrelated CA (a peer trusting only this one must fail)."""
    other_client_cert: Path
    """A client certificate signed by the unrelated CA."""
    other_client_key: Path


def make_test_pki(folder: Path, *, hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
                  days: int = 2) -> TestPKI:
    """Write a CA, a server certificate for ``hosts`` and a client certificate into ``folder``.

    Uses the ``cryptography`` package (EC P-256 keys, valid ``days`` days). For tests and the
    demo only; a hospital uses its own PKI.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    later = now + dt.timedelta(days=days)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "OmniMRI test"),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def save(stem: str, key: ec.EllipticCurvePrivateKey,
             cert: x509.Certificate) -> tuple[Path, Path]:
        kp, cp = folder / f"{stem}.key", folder / f"{stem}.crt"
        kp.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.TraditionalOpenSSL,
                                         serialization.NoEncryption()))
        kp.chmod(0o600)
        cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cp, kp

    def ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(later)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256())
        )
        return key, cert

    def leaf(cn: str, issuer_key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate,
             server: bool) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = []
        for h in hosts if server else ():
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                sans.append(x509.DNSName(h))
        builder = (
            x509.CertificateBuilder().subject_name(name(cn)).issuer_name(issuer.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(later)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                issuer_key.public_key()), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return key, builder.sign(issuer_key, hashes.SHA256())

    ca_key, ca_cert = ca("OmniMRI test CA")
    ca_cp, ca_kp = save("ca", ca_key, ca_cert)
    s_cp, s_kp = save("server", *leaf("omnimri-node", ca_key, ca_cert, server=True))
    c_cp, c_kp = save("client", *leaf("MODALITY1", ca_key, ca_cert, server=False))
    o_key, o_cert = ca("Unrelated CA")
    o_cp, _ = save("other-ca", o_key, o_cert)
    oc_cp, oc_kp = save("other-client", *leaf("INTRUDER", o_key, o_cert, server=False))
    return TestPKI(ca_cert=ca_cp, ca_key=ca_kp, server_cert=s_cp, server_key=s_kp,
                   client_cert=c_cp, client_key=c_kp, other_ca_cert=o_cp,
                   other_client_cert=oc_cp, other_client_key=oc_kp)
