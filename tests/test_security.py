"""Bearer tokens with scopes, TLS and mutual TLS (a throwaway CA made with `cryptography`)."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path
from typing import Any

import pytest
import torch

from gradserve import (
    Client,
    PermissionDeniedError,
    UnauthenticatedError,
    UnavailableError,
)

LINEAR = [{"type": "Linear", "in_features": 2, "out_features": 1}]


def _tokens(tmp_path: Path) -> str:
    path = tmp_path / "tokens"
    path.write_text("# token scopes\nadmin-token\nreader read\ntrainer read,train\n")
    return str(path)


@pytest.mark.hostile("auth, tokens, TLS")
def test_tokens_and_scopes(make_server: Any, tmp_path: Path) -> None:
    server = make_server(auth_token_file=_tokens(tmp_path))
    address = f"127.0.0.1:{server.port}"
    with Client(address) as anonymous:
        assert anonymous.health() == "SERVING"  # health stays open
        with pytest.raises(UnauthenticatedError, match="bearer token"):
            anonymous.list_models()
    with Client(address, token="wrong") as wrong:
        with pytest.raises(UnauthenticatedError):
            wrong.list_models()
    with Client(address, token="admin-token") as admin:
        m = admin.create_model(layers=LINEAR, loss="mse", seed=0, model_id="secured")
    with Client(address, token="reader") as reader:
        assert reader.model("secured").forward(torch.ones(1, 2)).shape == (1, 1)
        with pytest.raises(PermissionDeniedError, match="needs scope 'train'"):
            reader.model("secured").backward(torch.ones(1, 2), torch.ones(1, 1))
    with Client(address, token="trainer") as trainer:
        remote = trainer.model("secured")
        assert remote.backward(torch.ones(1, 2), torch.ones(1, 1), step=True).step == 1
        with pytest.raises(PermissionDeniedError, match="admin"):
            trainer.delete_model("secured")
    assert m.id == "secured"


def _make_ca(tmp_path: Path) -> dict[str, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc)

    def key() -> Any:
        return ec.generate_private_key(ec.SECP256R1())

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = key()
    ca = (x509.CertificateBuilder().subject_name(name("test-ca")).issuer_name(name("test-ca"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=1))
          .not_valid_after(now + dt.timedelta(hours=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, server: bool) -> tuple[Any, Any]:
        k = key()
        b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject)
             .public_key(k.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(minutes=1))
             .not_valid_after(now + dt.timedelta(hours=1)))
        if server:
            b = b.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
        return k, b.sign(ca_key, hashes.SHA256())

    out: dict[str, Path] = {}

    def write(label: str, k: Any, cert: Any) -> None:
        out[f"{label}.crt"] = tmp_path / f"{label}.crt"
        out[f"{label}.crt"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if k is not None:
            out[f"{label}.key"] = tmp_path / f"{label}.key"
            out[f"{label}.key"].write_bytes(k.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))

    write("ca", None, ca)
    write("server", *leaf("localhost", True))
    write("client", *leaf("client", False))
    return out


def test_tls(make_server: Any, tmp_path: Path) -> None:
    pki = _make_ca(tmp_path)
    server = make_server(tls_cert=str(pki["server.crt"]), tls_key=str(pki["server.key"]))
    with Client(f"127.0.0.1:{server.port}", root_certificates=str(pki["ca.crt"])) as client:
        assert client.create_model(layers=LINEAR, seed=0).forward(torch.ones(1, 2)).shape == (1, 1)
    with Client(f"127.0.0.1:{server.port}", timeout=3, retries=0) as plaintext:
        with pytest.raises(UnavailableError):
            plaintext.list_models()


@pytest.mark.hostile("auth, tokens, TLS")
def test_mutual_tls(make_server: Any, tmp_path: Path) -> None:
    pki = _make_ca(tmp_path)
    server = make_server(tls_cert=str(pki["server.crt"]), tls_key=str(pki["server.key"]),
                         tls_client_ca=str(pki["ca.crt"]))
    address = f"127.0.0.1:{server.port}"
    with Client(address, root_certificates=str(pki["ca.crt"]), client_cert=str(pki["client.crt"]),
                client_key=str(pki["client.key"])) as client:
        assert client.list_models() == []
    with Client(address, root_certificates=str(pki["ca.crt"]), timeout=3, retries=0) as anonymous:
        with pytest.raises(UnavailableError):
            anonymous.list_models()
