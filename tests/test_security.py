"""Bearer tokens, TLS and mutual TLS: settings, the interceptor, the SDK and both CLIs, on real servers."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import ipaddress
import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from autopipeline import AsyncClient, Client, UnauthenticatedError, UnavailableError, tls_credentials
from autopipeline._cli import main as cli_main
from autopipeline.v1 import autopipeline_pb2 as pb
from autopipeline.v1 import autopipeline_pb2_grpc as pb_grpc
from autopipeline_server.cli import build_parser, check_health, serve_flags
from autopipeline_server.settings import (
    ConfigError,
    ModelSpec,
    Settings,
    describe,
    load_settings,
    read_config_file,
)

from .support import ServerThread

FILE_TOKEN = "file-token-1"
ENV_TOKEN = "env-token-2"
TLS_TOKEN = "tls-token"

# ----------------------------------------------------------------------------------- certificates


@dataclasses.dataclass(frozen=True)
class Pki:
    """PEM files: a CA, a server certificate for localhost/127.0.0.1, a client certificate it signed,
    and a client certificate from a CA the server does not trust."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    stranger_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer or (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
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
    elif server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Path:
    (directory / f"{stem}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path = directory / f"{stem}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca_key, stranger_ca_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    issuer = ("test CA", ca_key)
    ca = _write(root, "ca", _certificate("test CA", ca_key, None, ca=True), ca_key)
    keys = {stem: ec.generate_private_key(ec.SECP256R1()) for stem in ("server", "client", "stranger")}
    server = _write(
        root, "server", _certificate("localhost", keys["server"], issuer, server=True), keys["server"]
    )
    client = _write(root, "client", _certificate("client", keys["client"], issuer), keys["client"])
    stranger = _write(
        root,
        "stranger",
        _certificate("stranger", keys["stranger"], ("other CA", stranger_ca_key)),
        keys["stranger"],
    )
    return Pki(
        ca=ca,
        server_cert=server,
        server_key=root / "server.key",
        client_cert=client,
        client_key=root / "client.key",
        stranger_cert=stranger,
        stranger_key=root / "stranger.key",
    )


# ---------------------------------------------------------------------------------------- servers


def _flags(checkpoints: dict[str, Path], **overrides: Any) -> dict[str, Any]:
    """Serve flags as `cli.py` passes them to `load_settings`: the tiny sd15 model on 127.0.0.1:0."""
    return {
        "models": (ModelSpec("sd15", str(checkpoints["sd15"])),),
        "host": "127.0.0.1",
        "port": 0,
        "device": "cpu",
        "grace": 5.0,
        **overrides,
    }


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "tokens"
    path.write_text(f"# tokens for the test server\n\n  {FILE_TOKEN}  \n# retired: old-token\n")
    return path


@pytest.fixture(scope="module")
def token_server(checkpoints: dict[str, Path], token_file: Path) -> Iterator[ServerThread]:
    """Plain text, two tokens: one from a file with comments, one from AUTOPIPELINE_AUTH_TOKENS."""
    settings = load_settings(
        _flags(checkpoints, auth_token_file=str(token_file)), {"AUTOPIPELINE_AUTH_TOKENS": ENV_TOKEN}
    )
    running = ServerThread(settings)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def tls_server(checkpoints: dict[str, Path], pki: Pki) -> Iterator[ServerThread]:
    """TLS and a token."""
    settings = load_settings(
        _flags(checkpoints, tls_cert_file=str(pki.server_cert), tls_key_file=str(pki.server_key)),
        {"AUTOPIPELINE_AUTH_TOKENS": TLS_TOKEN},
    )
    running = ServerThread(settings)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def mtls_server(checkpoints: dict[str, Path], pki: Pki) -> Iterator[ServerThread]:
    """Mutual TLS, no token."""
    settings = load_settings(
        _flags(
            checkpoints,
            tls_cert_file=str(pki.server_cert),
            tls_key_file=str(pki.server_key),
            tls_client_ca_file=str(pki.ca),
        ),
        {},
    )
    running = ServerThread(settings)
    yield running
    running.stop()


def _bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def _error_info(err: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(err)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError("no ErrorInfo in the status")


def _inspect(channel: grpc.Channel, metadata: list[tuple[str, str]] | None = None) -> pb.InspectResponse:
    return pb_grpc.AutoPipelineServiceStub(channel).Inspect(
        pb.InspectRequest(), metadata=metadata, timeout=30
    )


# ------------------------------------------------------------------------------------ bearer tokens


@pytest.mark.parametrize(
    "metadata",
    [
        pytest.param(None, id="missing"),
        pytest.param(_bearer("wrong-token"), id="wrong"),
        pytest.param(_bearer(FILE_TOKEN + "x"), id="longer"),
        pytest.param([("authorization", f"Basic {FILE_TOKEN}")], id="other-scheme"),
        pytest.param([("authorization", FILE_TOKEN)], id="no-scheme"),
        pytest.param([("authorization", "Bearer ")], id="empty"),
        pytest.param([*_bearer(FILE_TOKEN), *_bearer("wrong-token")], id="two-headers"),
    ],
)
def test_a_call_without_an_accepted_token_is_unauthenticated(
    token_server: ServerThread, metadata: list[tuple[str, str]] | None
) -> None:
    with grpc.insecure_channel(token_server.target) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            _inspect(channel, metadata)
        stream = pb_grpc.AutoPipelineServiceStub(channel).Generate(
            pb.GenerateRequest(prompt="x", task=pb.TASK_TEXT_TO_IMAGE), metadata=metadata, timeout=30
        )
        with pytest.raises(grpc.RpcError) as raised_stream:
            list(stream)
    for err in (raised.value, raised_stream.value):
        assert err.code() is grpc.StatusCode.UNAUTHENTICATED
        info = _error_info(err)
        assert (info.reason, info.domain) == ("UNAUTHENTICATED", "autopipeline.v1")
        assert info.metadata["request_id"]
        # Never echo what the caller sent: it may be a real token for another service.
        assert "token-" not in (err.details() or "")
        assert dict(err.trailing_metadata() or ())["x-request-id"] == info.metadata["request_id"]


@pytest.mark.parametrize("token", [FILE_TOKEN, ENV_TOKEN])
def test_each_configured_token_admits_generate_and_inspect(token_server: ServerThread, token: str) -> None:
    with grpc.insecure_channel(token_server.target) as channel:
        assert [m.name for m in _inspect(channel, _bearer(token)).models] == ["sd15"]
        responses = list(
            pb_grpc.AutoPipelineServiceStub(channel).Generate(
                pb.GenerateRequest(prompt="a cube", task=pb.TASK_TEXT_TO_IMAGE, num_inference_steps=1),
                metadata=_bearer(token),
                timeout=60,
            )
        )
    assert responses[-1].WhichOneof("event") == "completed"


def test_the_scheme_is_case_insensitive(token_server: ServerThread) -> None:
    with grpc.insecure_channel(token_server.target) as channel:
        assert _inspect(channel, [("authorization", f"bearer {FILE_TOKEN}")]).models


def test_health_and_reflection_need_no_token(token_server: ServerThread) -> None:
    with grpc.insecure_channel(token_server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        responses = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        services = {s.name for r in responses for s in r.list_services_response.service}
    assert "autopipeline.v1.AutoPipelineService" in services
    assert check_health(token_server.target, "", 5) == 0


def test_sdk_client_sends_its_token(token_server: ServerThread) -> None:
    with Client(token_server.target, timeout=60, token=ENV_TOKEN) as client:
        assert client.inspect().models[0].name == "sd15"
        assert len(client.generate("a cube", num_inference_steps=1).images) == 1
    with (
        Client(token_server.target, timeout=60, token="wrong-token") as client,
        pytest.raises(UnauthenticatedError) as raised,
    ):
        client.inspect()
    assert (raised.value.code, raised.value.reason) == ("UNAUTHENTICATED", "UNAUTHENTICATED")
    assert raised.value.request_id


def test_async_client_sends_its_token(token_server: ServerThread) -> None:
    async def run() -> int:
        async with AsyncClient(token_server.target, timeout=60, token=FILE_TOKEN) as client:
            return len((await client.generate("a cube", num_inference_steps=1)).images)

    assert asyncio.run(run()) == 1


def test_cli_token_flag_and_environment(
    token_server: ServerThread, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["--target", token_server.target, "--token", FILE_TOKEN, "inspect", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["models"][0]["name"] == "sd15"

    monkeypatch.setenv("AUTOPIPELINE_TOKEN", ENV_TOKEN)
    assert cli_main(["--target", token_server.target, "inspect"]) == 0
    capsys.readouterr()

    monkeypatch.delenv("AUTOPIPELINE_TOKEN")
    assert cli_main(["--target", token_server.target, "inspect"]) == 1
    err = capsys.readouterr().err
    assert "error: UNAUTHENTICATED (UNAUTHENTICATED)" in err
    assert "request id:" in err


# ---------------------------------------------------------------------------------------------- TLS


def test_plaintext_client_cannot_reach_a_tls_server(tls_server: ServerThread) -> None:
    with grpc.insecure_channel(tls_server.target) as channel, pytest.raises(grpc.RpcError) as raised:
        _inspect(channel, _bearer(TLS_TOKEN))
    assert raised.value.code() is grpc.StatusCode.UNAVAILABLE


def test_tls_client_trusting_the_ca_still_needs_the_token(tls_server: ServerThread, pki: Pki) -> None:
    credentials = tls_credentials(ca_file=pki.ca)
    with grpc.secure_channel(tls_server.target, credentials) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            _inspect(channel)
        assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert _inspect(channel, _bearer(TLS_TOKEN)).models


def test_sdk_over_tls_sends_the_token_as_call_credentials(tls_server: ServerThread, pki: Pki) -> None:
    credentials = tls_credentials(ca_file=str(pki.ca))
    with Client(tls_server.target, timeout=60, credentials=credentials, token=TLS_TOKEN) as client:
        assert len(client.generate("a cube", num_inference_steps=1).images) == 1

    async def run() -> str:
        async with AsyncClient(
            tls_server.target, timeout=60, credentials=credentials, token=TLS_TOKEN
        ) as aio:
            return (await aio.inspect()).models[0].name

    assert asyncio.run(run()) == "sd15"


def test_sdk_without_the_ca_does_not_trust_the_server(tls_server: ServerThread) -> None:
    credentials = tls_credentials()  # the system's roots, which do not include the test CA
    with (
        Client(tls_server.target, timeout=10, credentials=credentials, token=TLS_TOKEN) as client,
        pytest.raises(UnavailableError),
    ):
        client.inspect()


def test_cli_over_tls(tls_server: ServerThread, pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--target", tls_server.target, "--tls-ca", str(pki.ca), "--token", TLS_TOKEN, "inspect", "--json"]
    assert cli_main(argv) == 0
    assert json.loads(capsys.readouterr().out)["models"][0]["name"] == "sd15"


def test_health_command_over_tls(tls_server: ServerThread, pki: Pki) -> None:
    assert check_health(tls_server.target, "sd15", 5, tls_ca=str(pki.ca)) == 0
    # --tls-server-name is the name checked against the certificate, whatever the target's host.
    assert check_health(tls_server.target, "", 5, tls_ca=str(pki.ca), tls_server_name="localhost") == 0
    assert check_health(tls_server.target, "", 5, tls_ca=str(pki.ca), tls_server_name="example.com") == 1
    assert check_health(tls_server.target, "", 5) == 1


# --------------------------------------------------------------------------------------- mutual TLS


def test_mtls_client_without_a_certificate_is_refused(mtls_server: ServerThread, pki: Pki) -> None:
    with (
        grpc.secure_channel(mtls_server.target, tls_credentials(ca_file=pki.ca)) as channel,
        pytest.raises(grpc.RpcError) as raised,
    ):
        _inspect(channel)
    assert raised.value.code() is grpc.StatusCode.UNAVAILABLE


def test_mtls_client_with_an_untrusted_certificate_is_refused(mtls_server: ServerThread, pki: Pki) -> None:
    credentials = tls_credentials(ca_file=pki.ca, cert_file=pki.stranger_cert, key_file=pki.stranger_key)
    with (
        Client(mtls_server.target, timeout=10, credentials=credentials) as client,
        pytest.raises(UnavailableError),
    ):
        client.inspect()


def test_mtls_client_with_its_certificate_is_served(
    mtls_server: ServerThread, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    credentials = tls_credentials(ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key)
    with Client(mtls_server.target, timeout=60, credentials=credentials) as client:
        assert len(client.generate("a cube", num_inference_steps=1).images) == 1
    tls = ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]
    assert cli_main(["--target", mtls_server.target, *tls, "inspect"]) == 0
    assert "sd15" in capsys.readouterr().out
    assert check_health(mtls_server.target, "", 5, tls_ca=tls[1], tls_cert=tls[3], tls_key=tls[5]) == 0
    assert check_health(mtls_server.target, "", 5, tls_ca=tls[1]) == 1


# ----------------------------------------------------------------------------------- settings (units)


def _settings(**overrides: Any) -> Settings:
    return Settings(models=(ModelSpec("m", "/m"),), **overrides)


def test_serve_flags_reach_the_settings(tmp_path: Path, pki: Pki, token_file: Path) -> None:
    args = build_parser().parse_args(
        ["serve", "--model", "m=/m", "--auth-token-file", str(token_file),
         "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--tls-client-ca", str(pki.ca)]
    )  # fmt: skip
    settings = load_settings(serve_flags(args), {})
    assert settings.tokens == (FILE_TOKEN,)
    assert (settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file) == (
        str(pki.server_cert), str(pki.server_key), str(pki.ca),
    )  # fmt: skip


def test_tokens_from_the_file_and_the_environment_are_merged(token_file: Path) -> None:
    settings = load_settings(
        {"models": "m=/m", "auth_token_file": str(token_file)},
        {"AUTOPIPELINE_AUTH_TOKENS": f" {ENV_TOKEN}, {FILE_TOKEN} ,"},
    )
    assert settings.tokens == (FILE_TOKEN, ENV_TOKEN)


def test_tokens_are_never_shown(token_file: Path) -> None:
    settings = load_settings({"models": "m=/m", "auth_token_file": str(token_file)}, {})
    for text in (describe(settings), repr(settings), str(settings)):
        assert FILE_TOKEN not in text
    assert json.loads(describe(settings))["tokens"] == "<1 redacted>"


@pytest.mark.parametrize("origin", ["config", "environment"])
def test_tokens_cannot_be_set_where_they_would_leak(tmp_path: Path, origin: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text('models = ["m=/m"]\ntokens = ["s3cret-token"]\n' if origin == "config" else "")
    environ = {"AUTOPIPELINE_TOKENS": "s3cret-token"} if origin == "environment" else {}
    with pytest.raises(ConfigError, match="auth_token_file or AUTOPIPELINE_AUTH_TOKENS") as raised:
        load_settings({"models": "m=/m"}, environ, config_file=config)
    assert "s3cret" not in str(raised.value)


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        (("good-token", "has space"), "auth token 2 of 2 must be non-empty printable ASCII"),
        (("",), "auth token 1 of 1"),
        (("naïve-token",), "auth token 1 of 1"),
    ],
)
def test_malformed_tokens_are_rejected_without_being_quoted(tokens: tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        _settings(tokens=tokens).validate()
    assert all(token not in str(raised.value) for token in tokens if token)


def test_a_token_file_must_exist_and_hold_a_token(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read auth_token_file"):
        load_settings({"models": "m=/m", "auth_token_file": str(tmp_path / "missing")}, {})
    empty = tmp_path / "empty"
    empty.write_text("# nothing here yet\n\n")
    with pytest.raises(ConfigError, match="holds no token"):
        load_settings({"models": "m=/m", "auth_token_file": str(empty)}, {})
    # Built without load_settings, the file was never read: refuse rather than serve without auth.
    with pytest.raises(ConfigError, match="holds no token"):
        _settings(auth_token_file=str(empty)).validate()


def test_tls_settings_are_validated(tmp_path: Path, pki: Pki) -> None:
    cert, key, ca = str(pki.server_cert), str(pki.server_key), str(pki.ca)
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    cases = [
        ({"tls_cert_file": cert}, "tls_cert_file and tls_key_file go together"),
        ({"tls_key_file": key}, "tls_cert_file and tls_key_file go together"),
        ({"tls_client_ca_file": ca}, "needs tls_cert_file and tls_key_file"),
        ({"tls_cert_file": str(tmp_path / "missing.pem"), "tls_key_file": key}, "tls_cert_file: cannot read"),
        ({"tls_cert_file": cert, "tls_key_file": str(not_pem)}, "tls_key_file: .* is not a PEM file"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            _settings(**overrides).validate()
    _settings(tls_cert_file=cert, tls_key_file=key, tls_client_ca_file=ca).validate()


def test_example_config_security_keys_work_once_uncommented(tmp_path: Path) -> None:
    text = (Path(__file__).parents[1] / "examples" / "config.toml").read_text()
    keys = ("auth_token_file", "tls_cert_file", "tls_key_file", "tls_client_ca_file")
    for key in keys:
        text = text.replace(f"# {key} = ", f"{key} = ")
    uncommented = tmp_path / "config.toml"
    uncommented.write_text(text)
    # At the top level, not swallowed by a [table] above them.
    assert set(keys) <= set(read_config_file(uncommented))


# ---------------------------------------------------------------------------------------- SDK (units)


def test_tls_credentials_wants_cert_and_key_together(pki: Pki) -> None:
    with pytest.raises(ValueError, match="go together"):
        tls_credentials(cert_file=pki.client_cert)
    with pytest.raises(OSError):  # noqa: PT011  # whichever errno the platform gives
        tls_credentials(ca_file=pki.ca.with_name("missing.pem"))


@pytest.mark.parametrize("token", ["", "two words", "line\nbreak"])
def test_client_rejects_a_malformed_token(token: str) -> None:
    with pytest.raises(ValueError, match="token must be") as raised:
        Client("localhost:1", token=token)
    assert token == "" or token not in str(raised.value)


def test_client_rejects_a_token_and_an_authorization_entry() -> None:
    with pytest.raises(ValueError, match="not both"):
        Client("localhost:1", token="abc", metadata=[("Authorization", "Bearer abc")])


def test_the_openai_door_serves_https_with_the_grpc_certificates(
    checkpoints: dict[str, Path], pki: Pki
) -> None:
    """Under mutual TLS the HTTP door asks for the same client certificates as the gRPC listener."""
    tls = {"tls_cert_file": str(pki.server_cert), "tls_key_file": str(pki.server_key)}
    settings = load_settings(
        _flags(checkpoints, http_port=0, tls_client_ca_file=str(pki.ca), **tls),
        {"AUTOPIPELINE_AUTH_TOKENS": "http-token"},
    )
    server = ServerThread(settings)
    try:
        request = urllib.request.Request(
            f"https://localhost:{server.running.http_port}/v1/models",
            headers={"Authorization": "Bearer http-token"},
        )
        context = ssl.create_default_context(cafile=str(pki.ca))
        # No client certificate: TLS 1.3 sends the refusal after the handshake, so it shows as a
        # dropped connection (or an alert, or a failed connect, depending on timing).
        with pytest.raises((ssl.SSLError, ConnectionError, urllib.error.URLError)):
            urllib.request.urlopen(request, context=context, timeout=30).close()
        context.load_cert_chain(pki.client_cert, pki.client_key)
        with urllib.request.urlopen(request, context=context, timeout=30) as response:
            assert [m["id"] for m in json.loads(response.read())["data"]] == ["sd15"]
    finally:
        server.stop()
