"""Settings: where they come from, how secrets are held, and what production refuses."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import SecretStr

from broker.core.config import ConfigurationError, Settings

# Canary values: they must never show up in a repr or an error message.
VAULT_TOKEN = "s.CanaryVaultToken7f3a9c2e1b"
DB_PASSWORD = "CanaryDbPassword5d8e2a"
DATABASE_URL = f"postgresql://broker:{DB_PASSWORD}@db.internal:5432/broker"
HS256_SECRET = "CanaryHs256SigningKey0123456789abcdef"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No BROKER_* variable from the outer shell leaks into these tests."""
    for name in list(os.environ):
        if name.upper().startswith("BROKER_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def public_key_pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def production(public_key_pem: str, **overrides: Any) -> dict[str, Any]:
    """A complete, safe production configuration, with overrides applied."""
    options: dict[str, Any] = {
        "env": "production",
        "vault_addrs": "https://vault-a.internal:8200,https://vault-b.internal:8200",
        "vault_token": VAULT_TOKEN,
        "jwt_public_key": public_key_pem,
        "jwt_audience": "tenant-secrets-broker",
        "database_url": DATABASE_URL,
    }
    options.update(overrides)
    return options


# --- sources ----------------------------------------------------------------------


def test_prefixed_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER_ENV", "test")
    monkeypatch.setenv("BROKER_PORT", "9001")
    monkeypatch.setenv("BROKER_JWT_AUDIENCE", "payments-api")
    monkeypatch.setenv("BROKER_VAULT_ADDRS", "https://a:8200, https://b:8200")
    monkeypatch.setenv("BROKER_JWT_ALGORITHMS", "RS256, ES256")

    settings = Settings(_env_file=None)

    assert settings.env == "test"
    assert settings.port == 9001
    assert settings.jwt_audience == "payments-api"
    assert settings.vault_addrs == ["https://a:8200", "https://b:8200"]
    assert settings.jwt_algorithms == ["RS256", "ES256"]


def test_the_refresh_batch_is_read_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings(_env_file=None).oauth_refresh_batch == 500
    monkeypatch.setenv("BROKER_OAUTH_REFRESH_BATCH", "2")
    assert Settings(_env_file=None).oauth_refresh_batch == 2
    for bad in ("0", "-5", "10001", "lots"):
        monkeypatch.setenv("BROKER_OAUTH_REFRESH_BATCH", bad)
        with pytest.raises(ValueError, match="oauth_refresh_batch"):
            Settings(_env_file=None)


def test_unprefixed_variables_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "9999")
    monkeypatch.setenv("VAULT_ADDRS", "https://elsewhere:8200")

    settings = Settings(_env_file=None)

    assert settings.port == 8000
    assert settings.vault_addrs == ["http://127.0.0.1:8200"]


def test_secrets_are_secretstr_and_masked_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER_VAULT_TOKEN", VAULT_TOKEN)
    monkeypatch.setenv("BROKER_DATABASE_URL", DATABASE_URL)
    monkeypatch.setenv("BROKER_JWT_HS256_SECRET", HS256_SECRET)

    settings = Settings(_env_file=None)

    assert isinstance(settings.vault_token, SecretStr)
    assert isinstance(settings.database_url, SecretStr)
    assert isinstance(settings.jwt_hs256_secret, SecretStr)
    assert settings.vault_token.get_secret_value() == VAULT_TOKEN
    assert settings.database_url.get_secret_value() == DATABASE_URL
    for rendered in (repr(settings), str(settings), settings.model_dump_json()):
        for canary in (VAULT_TOKEN, DB_PASSWORD, HS256_SECRET):
            assert canary not in rendered


def test_dotenv_file_in_the_working_directory_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text(
        "BROKER_PORT=9100\n"
        f"BROKER_DATABASE_URL={DATABASE_URL}\n"
        "BROKER_VAULT_ADDRS=https://a:8200,https://b:8200\n"
        "UNRELATED=ignored\n",
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)

    settings = Settings()

    assert settings.port == 9100
    assert settings.vault_addrs == ["https://a:8200", "https://b:8200"]
    assert settings.database_url is not None
    assert settings.database_url.get_secret_value() == DATABASE_URL


def test_environment_variable_wins_over_dotenv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text("BROKER_PORT=9100\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BROKER_PORT", "9200")

    assert Settings().port == 9200


def test_dev_is_the_default_and_tolerates_a_dev_setup() -> None:
    settings = Settings(_env_file=None, jwt_hs256_secret=HS256_SECRET)

    assert settings.env == "dev"
    assert settings.vault_addrs == ["http://127.0.0.1:8200"]


# --- production refusals ----------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"jwt_hs256_secret": HS256_SECRET}, "HS256"),
        (
            {"vault_addrs": "https://vault-a.internal:8200,http://vault-b.internal:8200"},
            "http://vault-b.internal:8200",
        ),
        ({"jwt_audience": None}, "audience"),
        ({"jwt_audience": ""}, "audience"),
        ({"jwt_public_key": None}, "verification key"),
        (
            {"jwt_public_key": None, "jwt_jwks_url": "http://idp.internal/.well-known/jwks.json"},
            "JWKS URL is not https",
        ),
        ({"database_url": None}, "database"),
        ({"oauth_redirect_base_url": "http://broker.example.com"}, "OAuth"),
        (
            {"oauth_return_urls": "https://app.example.com/ok,http://app.example.com/x"},
            "OAuth callback or return URL is not https",
        ),
        ({"console_oidc_issuer": "http://idp.internal"}, "console URL is not https"),
        ({"console_public_url": "http://broker.example.com"}, "console URL is not https"),
        ({"stripe_js_url": "http://js.stripe.test/v3/"}, "Stripe.js is not loaded over https"),
    ],
)
def test_production_refuses_an_unsafe_configuration(
    public_key_pem: str, overrides: dict[str, Any], named: str
) -> None:
    with pytest.raises(ConfigurationError) as refused:
        Settings(_env_file=None, **production(public_key_pem, **overrides))

    message = str(refused.value)
    assert named in message
    for canary in (VAULT_TOKEN, DB_PASSWORD, HS256_SECRET):
        assert canary not in message


def test_production_refusal_names_every_problem_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BROKER_ENV", "production")
    monkeypatch.setenv("BROKER_JWT_HS256_SECRET", HS256_SECRET)
    monkeypatch.setenv("BROKER_VAULT_TOKEN", VAULT_TOKEN)

    with pytest.raises(ConfigurationError) as refused:
        Settings(_env_file=None)

    message = str(refused.value)
    for named in ("HS256", "verification key", "http://127.0.0.1:8200", "database"):
        assert named in message
    assert HS256_SECRET not in message
    assert VAULT_TOKEN not in message


def test_production_refuses_a_dotenv_with_a_dev_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, public_key_pem: str
) -> None:
    (tmp_path / ".env").write_text(f"BROKER_JWT_HS256_SECRET={HS256_SECRET}\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)

    with pytest.raises(ConfigurationError, match="HS256") as refused:
        Settings(**production(public_key_pem))

    assert HS256_SECRET not in str(refused.value)


def test_production_accepts_a_correct_configuration(public_key_pem: str) -> None:
    settings = Settings(_env_file=None, **production(public_key_pem))

    assert settings.env == "production"
    assert settings.vault_addrs == [
        "https://vault-a.internal:8200",
        "https://vault-b.internal:8200",
    ]
    assert settings.jwt_public_key is not None
    assert settings.jwt_public_key.get_secret_value() == public_key_pem


def test_production_accepts_an_https_jwks_url(public_key_pem: str) -> None:
    settings = Settings(
        _env_file=None,
        **production(
            public_key_pem,
            jwt_public_key=None,
            jwt_jwks_url="https://idp.example.com/.well-known/jwks.json",
        ),
    )

    assert settings.jwt_jwks_url == "https://idp.example.com/.well-known/jwks.json"
