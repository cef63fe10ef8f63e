"""The client SDK services use to fetch tenants' credentials from the broker.

from broker.client import BrokerClient

with BrokerClient("https://broker.internal", token_provider=read_service_token) as broker:
    creds = broker.twilio("acme")          # TwilioCredentials, cached until near expiry
    woo = create_woo_service_for_tenant(broker, "acme")   # an httpx.Client
"""

from broker.client.factories import (
    LeaseAuth,
    TargetRefused,
    create_openai_client_for_tenant,
    create_shopify_service_for_tenant,
    create_twilio_service_for_tenant,
    create_woo_service_for_tenant,
)
from broker.client.sdk import (
    AccessDenied,
    BrokerClient,
    BrokerClientError,
    BrokerUnavailable,
    ChangeFollower,
    CredentialsNotFound,
    Lease,
    OpenAICredentials,
    ProviderCredentials,
    ReconnectRequired,
    ShopifyCredentials,
    TwilioCredentials,
    WhatsAppCredentials,
    WooCommerceCredentials,
    WrappingTokenTampered,
)

__all__ = [
    "AccessDenied",
    "BrokerClient",
    "BrokerClientError",
    "BrokerUnavailable",
    "ChangeFollower",
    "CredentialsNotFound",
    "Lease",
    "LeaseAuth",
    "OpenAICredentials",
    "ProviderCredentials",
    "ReconnectRequired",
    "ShopifyCredentials",
    "TargetRefused",
    "TwilioCredentials",
    "WhatsAppCredentials",
    "WooCommerceCredentials",
    "WrappingTokenTampered",
    "create_openai_client_for_tenant",
    "create_shopify_service_for_tenant",
    "create_twilio_service_for_tenant",
    "create_woo_service_for_tenant",
]
