"""Payment methods (Stripe references) and payout details."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response

from broker.auth.dependencies import own_tenant, require
from broker.auth.principal import Principal
from broker.auth.scopes import Scope
from broker.core.http import problem_responses
from broker.deps import EngineDep, SessionDep, StripeDep, VaultDep
from broker.models import PaymentProfile
from broker.payments import service
from broker.payments.schemas import (
    PAYMENT_METHOD_ID,
    PaymentMethodAdd,
    PaymentMethodView,
    PayoutRequest,
    PayoutView,
    SetupIntentView,
)
from broker.tenants import service as tenants

router = APIRouter(prefix="/v1/tenants/settings", tags=["payments"])

FinanceViewer = Annotated[Principal, require(Scope.FINANCE_VIEW, Scope.FINANCE_MANAGE)]
FinanceManager = Annotated[Principal, require(Scope.FINANCE_MANAGE, limit="write")]
MethodId = Annotated[str, Path(pattern=PAYMENT_METHOD_ID, max_length=100)]

NO_TENANT = problem_responses({404: "The token's tenant does not exist"})
NO_METHOD = problem_responses({404: "No such payment method, or no such tenant"})
# Routes that call Stripe: without a platform key they cannot work, and retrying won't help.
NO_STRIPE = problem_responses({501: "Stripe is not configured (no platform key in Vault)"})


@router.get("/payment-methods", response_model=list[PaymentMethodView], responses=NO_TENANT)
def list_payment_methods(session: SessionDep, principal: FinanceViewer) -> list[PaymentMethodView]:
    """The tenant's cards: token id, brand, last 4 digits, expiry, default flag."""
    methods = service.list_methods(session, principal=principal, tenant_id=own_tenant(principal))
    return [PaymentMethodView.model_validate(m) for m in methods]


@router.post(
    "/payment-methods/setup-intent",
    response_model=SetupIntentView,
    responses=NO_TENANT | NO_STRIPE,
)
def create_setup_intent(
    engine: EngineDep, stripe: StripeDep, principal: FinanceManager
) -> SetupIntentView:
    """A SetupIntent client secret, so Stripe.js tokenizes the card in the browser."""
    intent = service.create_setup_intent(
        engine, stripe, principal=principal, tenant_id=own_tenant(principal)
    )
    return SetupIntentView(id=intent.id, client_secret=intent.client_secret)


@router.post(
    "/payment-methods",
    status_code=201,
    response_model=PaymentMethodView,
    responses=problem_responses(
        {404: "The token's tenant does not exist", 409: "This payment method is already on file"}
    )
    | NO_STRIPE,
)
def add_payment_method(
    body: PaymentMethodAdd, engine: EngineDep, stripe: StripeDep, principal: FinanceManager
) -> PaymentMethodView:
    """Attach a tokenized card (`pm_...`) to the tenant; the first becomes the default."""
    method = service.add_method(
        engine,
        stripe,
        principal=principal,
        tenant_id=own_tenant(principal),
        payment_method_id=body.payment_method_id,
    )
    return PaymentMethodView.model_validate(method)


@router.post(
    "/payment-methods/{method_id}/default",
    response_model=PaymentMethodView,
    responses=NO_METHOD | NO_STRIPE,
)
def set_default_payment_method(
    method_id: MethodId, engine: EngineDep, stripe: StripeDep, principal: FinanceManager
) -> PaymentMethodView:
    """Make this card the default, also as the card Stripe Billing charges."""
    method = service.set_default(
        engine,
        stripe,
        principal=principal,
        tenant_id=own_tenant(principal),
        method_id=method_id,
    )
    return PaymentMethodView.model_validate(method)


@router.delete(
    "/payment-methods/{method_id}",
    status_code=204,
    response_class=Response,
    responses=NO_METHOD | NO_STRIPE,
)
def delete_payment_method(
    method_id: MethodId, engine: EngineDep, stripe: StripeDep, principal: FinanceManager
) -> Response:
    """Detach the card in Stripe and remove it; the default moves to another card."""
    service.remove_method(
        engine,
        stripe,
        principal=principal,
        tenant_id=own_tenant(principal),
        method_id=method_id,
    )
    return Response(status_code=204)


@router.get(
    "/payout",
    response_model=PayoutView,
    responses=problem_responses({404: "No payout destination is set, or no such tenant"}),
)
def read_payout(engine: EngineDep, vault: VaultDep, principal: FinanceViewer) -> PayoutView:
    """The payout destination, masked."""
    profile = service.get_payout(
        engine, vault, principal=principal, tenant_id=own_tenant(principal)
    )
    return _payout_view(profile)


@router.put("/payout", response_model=PayoutView, responses=NO_TENANT)
def set_payout(
    body: PayoutRequest, engine: EngineDep, vault: VaultDep, principal: FinanceManager
) -> PayoutView:
    """Validate and seal payout details in Vault; the answer is the masked view."""
    # Before anything is sealed: a missing tenant has no key to seal with.
    tenants.require_live(engine, tenant_id=own_tenant(principal))
    profile = service.put_payout(
        engine,
        vault,
        principal=principal,
        tenant_id=own_tenant(principal),
        method=body.method,
        details=body.parsed(),
    )
    return _payout_view(profile)


def _payout_view(profile: PaymentProfile) -> PayoutView:
    return PayoutView.model_validate(
        {
            "method": profile.payout_method,
            "hint": profile.payout_hint,
            "updated_at": profile.payout_updated_at,
            "updated_by": profile.payout_updated_by,
        }
    )
