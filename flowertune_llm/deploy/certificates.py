"""TLS certificates for a SuperLink and authentication keys for SuperNodes, as Flower reads them.

* :func:`make_certificates`: a CA and a SuperLink server certificate whose SANs name the addresses the
  SuperNodes and the ``flwr`` CLI dial (``ca.crt``, ``server.pem``, ``server.key``: what
  ``flower-superlink --ssl-ca-certfile --ssl-certfile --ssl-keyfile`` takes).
* :func:`make_supernode_key`: an ECDSA P-384 key pair for SuperNode authentication. The private key is
  OpenSSH PEM (``flower-supernode --auth-supernode-private-key`` reads it with cryptography's
  ``load_ssh_private_key``), the public key one OpenSSH line (``flwr supernode register`` reads it with
  ``load_ssh_public_key`` and accepts NIST curves only, so not ed25519); both are what
  ``ssh-keygen -t ecdsa -b 384`` writes.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowertune_llm.atomic import write_atomic

DEFAULT_SANS = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class Certificates:
    ca_cert: Path  # give this to SuperNodes (--root-certificates) and to the CLI (root-certificates)
    ca_key: Path  # keep it private: it can issue certificates every node trusts
    server_cert: Path
    server_key: Path

    def superlink_args(self) -> list[str]:
        return [
            "--ssl-ca-certfile",
            str(self.ca_cert),
            "--ssl-certfile",
            str(self.server_cert),
            "--ssl-keyfile",
            str(self.server_key),
        ]


def _san(name: str) -> Any:
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def make_certificates(
    directory: Path,
    sans: Iterable[str] = (),
    days: int = 365,
    new_ca: bool = False,
) -> Certificates:
    """Write ``ca.crt``/``ca.key`` and ``server.pem``/``server.key`` into ``directory``.

    The server certificate's SANs are 127.0.0.1, localhost and ``sans`` (IP addresses or DNS names): every
    address a SuperNode or the CLI uses to reach the SuperLink must be among them. An existing CA in
    ``directory`` is reused unless ``new_ca``, so re-issuing the server certificate (say, for a new SAN)
    does not invalidate the ``ca.crt`` already handed to the nodes. Keys are ECDSA P-256, written 0600.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory = Path(directory)
    certs = Certificates(directory / "ca.crt", directory / "ca.key", directory / "server.pem", directory / "server.key")
    names = list(dict.fromkeys([*DEFAULT_SANS, *sans]))
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)  # tolerate clock skew
    not_after = now + datetime.timedelta(days=days)

    def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    if not new_ca and certs.ca_cert.is_file() and certs.ca_key.is_file():
        ca_cert = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
        ca_key = serialization.load_pem_private_key(certs.ca_key.read_bytes(), password=None)
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flowertune-llm federation CA")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=max(days, 3650)))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        write_atomic(certs.ca_key, pem_key(ca_key), 0o600)
        write_atomic(certs.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(min(not_after, ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    write_atomic(certs.server_key, pem_key(server_key), 0o600)
    write_atomic(certs.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    return certs


# --------------------------------------------------------------------------------------------------------
# SuperNode authentication keys


@dataclass(frozen=True)
class SuperNodeKey:
    private: Path  # flower-supernode --auth-supernode-private-key
    public: Path  # flwr supernode register <public> <connection>


def make_supernode_key(directory: Path, name: str) -> SuperNodeKey:
    """An ECDSA P-384 key pair: ``<name>`` (OpenSSH private key, 0600) and ``<name>.pub`` (OpenSSH line).

    Flower accepts NIST curves only (ed25519 is refused). Same formats as ``ssh-keygen -t ecdsa -b 384``.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ValueError(f"key name {name!r}: use letters, digits, '.', '_' and '-' only")
    directory = Path(directory)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    pair = SuperNodeKey(directory / name, directory / f"{name}.pub")
    write_atomic(pair.private, private, 0o600)
    write_atomic(pair.public, public + f" {name}\n".encode())
    return pair
