"""Configuration: one pydantic-settings class, read from `BROKER_*` variables and `.env`."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Environment = Literal["dev", "test", "production"]


class ConfigurationError(RuntimeError):
    """The configuration is unsafe or incomplete; the broker refuses to start."""


class Settings(BaseSettings):
    """Everything the broker reads from its environment."""

    model_config = SettingsConfigDict(
        env_prefix="BROKER_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    env: Environment = "dev"
    data_dir: Path = Path(".broker")
    host: str = "127.0.0.1"
    port: int = 8000
    # Processes `broker serve` runs (uvicorn workers): each has its own event loop,
    # database pool and caches; rate limits are shared only through Redis.
    workers: int = Field(default=1, ge=1, le=64)
    log_level: str = "INFO"

    # PostgreSQL. A URL may carry a password, so it is a secret too.
    database_url: SecretStr | None = None

    # Vault / OpenBao. Several addresses are allowed (a raft cluster); the
    # gateway finds the one that answers.
    vault_addrs: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["http://127.0.0.1:8200"]
    )
    vault_token: SecretStr | None = None
    vault_role_id: SecretStr | None = None
    vault_secret_id: SecretStr | None = None
    vault_approle_mount: str = "approle"
    vault_namespace: str | None = None
    vault_ca_cert: Path | None = None
    vault_timeout_s: float = 5.0
    kv_mount: str = "secret"
    # Vault's file audit log, read for the tenants' access reports (issue 16); by
    # default `<data_dir>/vault/audit.log` and its rotated copies.
    vault_audit_log_paths: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    transit_mount: str = "transit"
    retry_after_s: int = 5
    # How long one request may retry Vault (node failover, elections) before a 503.
    vault_retry_budget_s: float = Field(default=3.0, gt=0, le=30)

    # Database bounds (issue 12, section B: a stalled database). Every database
    # call has a deadline, so a paused PostgreSQL answers 503 instead of hanging
    # requests; credential fetches run on their own threads, never the ones
    # database work can fill.
    database_statement_timeout_s: float = Field(default=5.0, gt=0, le=120)
    database_pool_timeout_s: float = Field(default=3.0, gt=0, le=60)
    database_connect_timeout_s: int = Field(default=3, ge=2, le=60)
    database_idle_in_transaction_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    database_pool_size: int = Field(default=10, ge=1, le=200)
    database_max_overflow: int = Field(default=10, ge=0, le=200)
    vault_threads: int = Field(default=16, ge=1, le=200)
    # How stale this process's view of tenant deletions may get (issue 12, section H).
    tenant_status_ttl_s: float = Field(default=2.0, gt=0, le=60)

    # Bearer tokens. Exactly one key source is used: JWKS URL, PEM public key,
    # or (dev and test only) an HS256 shared secret.
    jwt_issuer: str = "tenant-secrets-broker"
    jwt_audience: str | None = "tenant-secrets-broker"
    jwt_algorithms: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["RS256", "ES256", "EdDSA"]
    )
    jwt_jwks_url: str | None = None
    jwt_public_key: SecretStr | None = None
    jwt_hs256_secret: SecretStr | None = None
    jwt_leeway_s: int = 30
    # How long a verified token is remembered (capped by its own exp); 0 turns it off.
    jwt_cache_ttl_s: float = Field(default=60, ge=0, le=300)

    # Outbound calls to providers (connection tests). Loopback and plain HTTP
    # exist for tests and dev only; production refuses them.
    egress_allow_http: bool = False
    egress_allow_loopback: bool = False
    egress_timeout_s: float = Field(default=10.0, gt=0, le=10)
    twilio_base_url: str = "https://api.twilio.com"
    openai_base_url: str = "https://api.openai.com"
    graph_base_url: str = "https://graph.facebook.com"
    graph_api_version: str = "v21.0"
    shopify_api_version: str = "2024-10"
    shopify_base_url: str | None = None
    stripe_api_base: str = "https://api.stripe.com"
    # The platform Stripe key is read from Vault (KV `platform/stripe`, field `api_key`).
    stripe_key_path: str = "platform/stripe"

    # Service delivery: leases are short; each provider may cap them lower.
    credential_lease_s: int = Field(default=300, ge=10, le=3600)
    credential_lease_caps: dict[str, int] = Field(
        default_factory=lambda: {"openai": 600, "twilio": 900, "whatsapp": 900}
    )
    max_wrap_ttl_s: int = Field(default=600, ge=1, le=3600)
    # Dynamic credentials (broker/leases): how many live leases one service may hold per
    # tenant and provider; a live lease is handed out again while at least
    # `lease_reuse_min_s` of it is left (at most half a lease); the sweep revokes what is
    # due every `lease_sweep_s` (divides 60); a failed revocation is retried after
    # `lease_revoke_backoff_s`, doubling up to `lease_revoke_backoff_max_s`.
    lease_live_cap: int = Field(default=5, ge=1, le=1000)
    lease_reuse_min_s: int = Field(default=60, ge=0, le=3600)
    lease_sweep_s: int = Field(default=15, ge=1, le=60)
    lease_revoke_backoff_s: float = Field(default=5.0, gt=0, le=3600)
    lease_revoke_backoff_max_s: float = Field(default=3600.0, gt=0, le=86400)

    # Rate limits (the `limits` library's notation) and where their counters live.
    rate_limit_storage: str = "memory://"
    rate_limit_fetch: str = "1200/minute"
    rate_limit_write: str = "60/minute"
    rate_limit_auth_failures: str = "100/hour"
    trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Denied requests (403) per principal; past it they are answered 429 and
    # written to the audit trail as one event per window (issue 12, section I).
    rate_limit_denials: str = "30/minute"

    # Background jobs (broker/jobs: procrastinate on the broker's PostgreSQL).
    # A worker writes a heartbeat every `jobs_heartbeat_s`; the jobs of a worker
    # silent for `jobs_stalled_after_s` (killed, frozen, cut off) are retried by
    # another worker, looked for every `jobs_stalled_check_s` (divides 60).
    # Jobs start within `jobs_poll_interval_s` even if a notification is lost.
    jobs_concurrency: int = Field(default=4, ge=1, le=64)
    jobs_heartbeat_s: float = Field(default=10.0, gt=0, le=300)
    jobs_stalled_after_s: float = Field(default=30.0, gt=0, le=3600)
    jobs_stalled_check_s: int = Field(default=15, ge=1, le=60)
    jobs_poll_interval_s: float = Field(default=5.0, gt=0, le=60)

    # OAuth connect and refresh (issue 13, Shopify first). The callback the provider
    # sends the browser to is `<oauth_redirect_base_url>/v1/oauth/callback/<provider>`;
    # afterwards the browser goes to one of `oauth_return_urls` (an exact allowlist, the
    # first is the default), never to a URL a request names.
    oauth_redirect_base_url: str | None = None
    oauth_return_urls: Annotated[list[str], NoDecode] = Field(default_factory=list)
    oauth_state_ttl_s: int = Field(default=600, ge=60, le=3600)
    # A fetch refreshes an access token with less than this left.
    oauth_refresh_margin_s: int = Field(default=60, ge=0, le=1800)
    # How long a fetch waits for another process's refresh of the same credential.
    oauth_refresh_lock_timeout_s: float = Field(default=12.0, gt=0, le=30)
    # The background job refreshes access tokens with less than this left.
    oauth_refresh_ahead_s: int = Field(default=600, ge=60, le=3600)
    # Credentials one run of that job takes at most; a full run that made progress
    # queues the next at once, so a larger backlog drains back to back.
    oauth_refresh_batch: int = Field(default=500, ge=1, le=10_000)

    # The tenant-admin console (/console). In production users sign in through OpenID
    # Connect (authorization code with PKCE); the access token the identity provider
    # issues must be one the API itself accepts (BROKER_JWT_*). Outside production a
    # dev sign-in mints a token with the HS256 dev key instead.
    console_oidc_issuer: str | None = None
    console_oidc_client_id: str | None = None
    console_oidc_client_secret: SecretStr | None = None
    console_oidc_scope: str = "openid"
    # The console's public origin (https://broker.example.com): the OpenID Connect
    # redirect URI and the Origin every form post must come from. Without it, the
    # request's own scheme and Host.
    console_public_url: str | None = None
    console_session_ttl_s: int = Field(default=8 * 3600, ge=300, le=7 * 24 * 3600)
    # Stripe.js for the add-card page (the only page whose CSP lets it in).
    stripe_js_url: str = "https://js.stripe.com/v3/"
    stripe_publishable_key: str | None = None

    # Events (issue 16). The change feed's long-poll waits at most `events_feed_max_wait_s`
    # and looks for new events every `events_feed_poll_s` without holding a connection.
    events_feed_poll_s: float = Field(default=0.5, ge=0.05, le=5)
    events_feed_max_wait_s: int = Field(default=30, ge=0, le=60)
    # Webhook deliveries: the delay before each retry (Standard Webhooks' suggested
    # schedule, over three days in all); when it is spent the endpoint is disabled.
    webhook_retry_schedule_s: Annotated[list[float], NoDecode] = Field(
        default_factory=lambda: [
            5.0,
            300.0,
            1800.0,
            7200.0,
            18000.0,
            36000.0,
            50400.0,
            72000.0,
            86400.0,
        ]
    )
    webhook_timeout_s: float = Field(default=10.0, gt=0, le=10)
    # Events and finished deliveries older than this are deleted (daily); a feed reader
    # whose cursor is older misses them, and its SDK falls back to lease expiry.
    events_retention_days: int = Field(default=30, ge=1, le=3650)
    webhook_max_response_bytes: int = Field(default=64 * 1024, ge=1024, le=1024 * 1024)

    # Scheduled health checks of stored credentials: each is re-tested every interval
    # (per provider in `health_check_intervals`), spread by up to `health_check_jitter_s`.
    # A failed check is retried after `health_retry_s` before the state flips to failing;
    # a provider's 429 pauses its checks for `health_rate_limit_backoff_s`.
    health_check_interval_s: int = Field(default=6 * 3600, ge=1, le=7 * 86400)
    health_check_intervals: dict[str, int] = Field(default_factory=dict)
    health_check_jitter_s: float = Field(default=300.0, ge=0, le=86400)
    health_retry_s: float = Field(default=60.0, gt=0, le=86400)
    health_rate_limit_backoff_s: float = Field(default=900.0, gt=0, le=86400)
    health_schedule_every_s: int = Field(default=15, ge=1, le=60)
    health_batch: int = Field(default=1000, ge=1, le=100000)
    # Age (cryptoperiods, see the README): a pasted credential is due for rotation this
    # many days after its last change (per provider in `rotation_period_days`); reminders
    # go out `rotation_reminder_days` before, and `expiry_reminder_days` before a token
    # nothing renews expires.
    rotation_period_default_days: int = Field(default=365, ge=1, le=3650)
    rotation_period_days: dict[str, int] = Field(default_factory=dict)
    rotation_reminder_days: int = Field(default=14, ge=0, le=365)
    expiry_reminder_days: int = Field(default=7, ge=0, le=365)

    @field_validator("webhook_retry_schedule_s")
    @classmethod
    def _positive_delays(cls, value: list[float]) -> list[float]:
        if not value or any(delay <= 0 for delay in value):
            raise ValueError("the webhook retry schedule needs at least one positive delay")
        return value

    @field_validator(
        "vault_addrs",
        "jwt_algorithms",
        "trusted_proxies",
        "oauth_return_urls",
        "vault_audit_log_paths",
        "webhook_retry_schedule_s",
        mode="before",
    )
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("jwt_hs256_secret")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("the HS256 secret must be at least 32 characters")
        return value

    @field_validator("jwt_algorithms")
    @classmethod
    def _no_none_algorithm(cls, value: list[str]) -> list[str]:
        if any(alg.lower() == "none" for alg in value):
            raise ValueError("the 'none' algorithm is never accepted")
        return value

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> Settings:
        if self.env != "production":
            return self
        problems = [*self._token_problems(), *self._transport_problems()]
        if self.database_url is None:
            problems.append("no database (BROKER_DATABASE_URL)")
        if problems:
            raise ConfigurationError("refusing to start in production: " + "; ".join(problems))
        return self

    def _token_problems(self) -> list[str]:
        """What makes bearer-token verification unsafe in production."""
        problems = []
        if self.jwt_hs256_secret is not None:
            problems.append("an HS256 dev signing key is configured (BROKER_JWT_HS256_SECRET)")
        if not self.jwt_audience:
            problems.append("no token audience is configured (BROKER_JWT_AUDIENCE)")
        if not (self.jwt_jwks_url or self.jwt_public_key):
            problems.append("no token verification key (BROKER_JWT_JWKS_URL or _PUBLIC_KEY)")
        if self.jwt_jwks_url and not self.jwt_jwks_url.startswith("https://"):
            problems.append("the JWKS URL is not https")
        return problems

    def _transport_problems(self) -> list[str]:
        """Connections that would travel, or could be sent, in plain text."""
        problems = []
        plain = [addr for addr in self.vault_addrs if not addr.startswith("https://")]
        if plain:
            problems.append(f"Vault addresses without TLS: {', '.join(plain)}")
        if self.egress_allow_http or self.egress_allow_loopback:
            problems.append("provider calls may reach plain HTTP or loopback (BROKER_EGRESS_*)")
        # OAuth codes and outcomes travel in these URLs' queries.
        oauth_urls = [*self.oauth_return_urls, *filter(None, [self.oauth_redirect_base_url])]
        if any(not url.startswith("https://") for url in oauth_urls):
            problems.append("an OAuth callback or return URL is not https (BROKER_OAUTH_*)")
        console_urls = [*filter(None, [self.console_oidc_issuer, self.console_public_url])]
        if any(not url.startswith("https://") for url in console_urls):
            problems.append("a console URL is not https (BROKER_CONSOLE_*)")
        if not self.stripe_js_url.startswith("https://"):
            problems.append("Stripe.js is not loaded over https (BROKER_STRIPE_JS_URL)")
        return problems


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
