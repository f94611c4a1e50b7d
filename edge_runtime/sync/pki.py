"""Certificate tooling for the fleet's MQTT broker: a CA, a server certificate, client certificates.

Everything is ECDSA P-256 signed with SHA-256. The broker trusts one fleet CA; every device holds a
client certificate whose common name (CN) is its device id, and every fleet operator (publisher CLI,
telemetry consumers) holds one whose CN is its operator name. Mosquitto turns the CN into the MQTT
user name (``use_identity_as_username``), which the ACL (see :mod:`edge_runtime.sync.broker_config`)
keys on, so names are restricted to characters that are safe in MQTT topics and ACL files.

Files are ``<stem>.crt`` (PEM, mode 0644) and ``<stem>.key`` (PEM PKCS#8, mode 0600), each written
to a temporary file next to the target and renamed over it, so a reader never sees half a key::

    ca_crt, ca_key = create_ca(pki_dir, "plant1 fleet CA")
    issue_server_cert(ca_crt, ca_key, pki_dir, dns_names=["broker.plant1.lan", "localhost"])
    issue_client_cert(ca_crt, ca_key, pki_dir, "cam-0001")       # cam-0001.crt / cam-0001.key
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge_runtime.errors import ConfigError

__all__ = [
    "DEFAULT_CA_DAYS",
    "DEFAULT_CERT_DAYS",
    "create_ca",
    "issue_client_cert",
    "issue_server_cert",
    "validate_device_id",
]

log = logging.getLogger(__name__)

DEFAULT_CA_DAYS = 3650
DEFAULT_CERT_DAYS = 825
_CLOCK_SKEW = dt.timedelta(minutes=5)
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_CERT_MODE = 0o644
_KEY_MODE = 0o600


def validate_device_id(device_id: str, *, what: str = "device id") -> str:
    """Return ``device_id`` if it is a valid device id (or operator, fleet or group name), else raise.

    Valid: 1 to 64 characters from letters, digits, ``-``, ``_`` and ``.``. The name becomes an MQTT
    topic level and an MQTT user name, so the wildcards ``+`` and ``#``, ``/``, spaces and anything
    else are refused with :class:`~edge_runtime.errors.ConfigError`. ``what`` names the value in the
    message.
    """
    if not isinstance(device_id, str) or _NAME_RE.fullmatch(device_id) is None:
        raise ConfigError(
            f"invalid {what} {device_id!r}: use 1 to 64 characters from letters, digits, '-', '_' and "
            "'.' (no spaces, no '/', and no MQTT wildcards '+' or '#')"
        )
    return device_id


def _check_days(days: int) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ConfigError(f"invalid certificate validity {days!r} days: give a whole number of days >= 1")


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` via a same-directory temporary file and a rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _prepare_dir(directory: Path | str) -> Path:
    out = Path(directory)
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create the certificate directory {out}: {exc}; choose a writable path"
        ) from exc
    return out


def _save(
    directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    cert_path = directory / f"{stem}.crt"
    key_path = directory / f"{stem}.key"
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        _write_atomic(key_path, key_pem, _KEY_MODE)
        _write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), _CERT_MODE)
    except OSError as exc:
        raise ConfigError(
            f"cannot write {stem}.crt/{stem}.key in {directory}: {exc}; check the path and its permissions"
        ) from exc
    return cert_path, key_path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.timezone.utc)
    return now - _CLOCK_SKEW, now + dt.timedelta(days=days)


def create_ca(
    directory: Path | str, name: str, *, days: int = DEFAULT_CA_DAYS, overwrite: bool = False
) -> tuple[Path, Path]:
    """Create a self-signed fleet CA and return ``(cert_path, key_path)`` (``ca.crt``, ``ca.key``).

    ``name`` is the CA's common name (free text). An existing CA in ``directory`` is never replaced
    unless ``overwrite`` is true, because that would orphan every certificate it issued.
    """
    if not name or not name.isprintable():
        raise ConfigError(f"invalid CA name {name!r}: give a non-empty printable name")
    _check_days(days)
    out = _prepare_dir(directory)
    if not overwrite and ((out / "ca.crt").exists() or (out / "ca.key").exists()):
        raise ConfigError(
            f"a CA already exists in {out}: reuse it, choose another directory or pass overwrite=True "
            "(every certificate it issued stops being trusted)"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    not_before, not_after = _validity(days)
    subject = _name(name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    paths = _save(out, "ca", cert, key)
    log.info("created CA %r in %s (valid %d days)", name, out, days)
    return paths


def _load_ca(ca_cert: Path | str, ca_key: Path | str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(Path(ca_cert).read_bytes())
        key = serialization.load_pem_private_key(Path(ca_key).read_bytes(), password=None)
    except OSError as exc:
        raise ConfigError(f"cannot read the CA: {exc}; create one with create_ca()") from exc
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(
            f"the CA files {ca_cert} / {ca_key} are not a PEM certificate and unencrypted PEM key: {exc}"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise ConfigError(f"the CA key {ca_key} does not belong to the CA certificate {ca_cert}")
    return cert, key


def _issue(
    ca_cert: Path | str,
    ca_key: Path | str,
    directory: Path | str,
    stem: str,
    common_name: str,
    days: int,
    usage: x509.ObjectIdentifier,
    san: x509.SubjectAlternativeName | None,
) -> tuple[Path, Path]:
    _check_days(days)
    issuer_cert, issuer_key = _load_ca(ca_cert, ca_key)
    out = _prepare_dir(directory)
    ca_files = {Path(ca_cert).resolve(), Path(ca_key).resolve()}
    if {(out / f"{stem}.crt").resolve(), (out / f"{stem}.key").resolve()} & ca_files:
        raise ConfigError(
            f"issuing {stem!r} into {out} would overwrite the CA's own files: use another directory or name"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    not_before, not_after = _validity(days)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(min(not_after, issuer_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    paths = _save(out, stem, builder.sign(issuer_key, hashes.SHA256()), key)
    log.info("issued certificate CN=%s in %s (valid %d days)", common_name, out, days)
    return paths


def issue_server_cert(
    ca_cert: Path | str,
    ca_key: Path | str,
    directory: Path | str,
    *,
    common_name: str = "edgert-broker",
    dns_names: Sequence[str] = ("localhost",),
    ip_addresses: Sequence[str] = ("127.0.0.1",),
    days: int = DEFAULT_CERT_DAYS,
    stem: str = "server",
) -> tuple[Path, Path]:
    """Issue the broker's TLS server certificate and return ``(cert_path, key_path)``.

    Clients verify the broker's host name against the subject alternative names, so list every DNS
    name and IP address devices use to reach it. Files are ``<stem>.crt`` and ``<stem>.key``.
    """
    validate_device_id(stem, what="file stem")
    entries: list[x509.GeneralName] = []
    for dns in dns_names:
        if not dns or any(c.isspace() or c == "/" for c in dns):
            raise ConfigError(f"invalid DNS name {dns!r} for the server certificate: give a host name")
        entries.append(x509.DNSName(dns))
    for ip in ip_addresses:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError as exc:
            raise ConfigError(f"invalid IP address {ip!r} for the server certificate: {exc}") from exc
    if not entries:
        raise ConfigError("a server certificate needs at least one DNS name or IP address to be verifiable")
    if not common_name or not common_name.isprintable():
        raise ConfigError(f"invalid server common name {common_name!r}: give a non-empty printable name")
    return _issue(
        ca_cert,
        ca_key,
        directory,
        stem,
        common_name,
        days,
        ExtendedKeyUsageOID.SERVER_AUTH,
        x509.SubjectAlternativeName(entries),
    )


def issue_client_cert(
    ca_cert: Path | str,
    ca_key: Path | str,
    directory: Path | str,
    common_name: str,
    *,
    days: int = DEFAULT_CERT_DAYS,
) -> tuple[Path, Path]:
    """Issue a client certificate whose CN is a device id or operator name; return ``(cert, key)``.

    The CN is validated with :func:`validate_device_id` and is also the file stem
    (``<common_name>.crt`` / ``<common_name>.key``). Re-issuing replaces both files.
    """
    validate_device_id(common_name, what="client certificate name")
    return _issue(
        ca_cert, ca_key, directory, common_name, common_name, days, ExtendedKeyUsageOID.CLIENT_AUTH, None
    )
