"""TLS certificates and SuperNode keys in the formats Flower's own readers take."""

from __future__ import annotations

from flowertune_llm.deploy.certificates import make_certificates, make_supernode_key


def test_certificates_name_every_address_and_chain_to_the_ca(tmp_path):
    from cryptography import x509

    certs = make_certificates(tmp_path / "certs", sans=["10.0.0.5", "superlink.example.org"])
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "10.0.0.5"]
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "superlink.example.org"]
    assert certs.ca_key.stat().st_mode & 0o777 == 0o600 and certs.server_key.stat().st_mode & 0o777 == 0o600
    # Re-issuing the server certificate keeps the CA the nodes already have.
    again = make_certificates(tmp_path / "certs")
    assert again.ca_cert.read_bytes() == certs.ca_cert.read_bytes()
    x509.load_pem_x509_certificate(again.server_cert.read_bytes()).verify_directly_issued_by(ca)
    assert not list(certs.ca_cert.parent.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_supernode_keys_load_with_flowers_own_readers(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key

    key = make_supernode_key(tmp_path / "keys", "hospital-a")
    private = load_ssh_private_key(key.private.read_bytes(), None)  # what flower-supernode does
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert try_load_public_key(key.public)  # what `flwr supernode register` does; exits on a bad key
    assert key.public.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert key.private.stat().st_mode & 0o777 == 0o600
