"""Payments pages: cards (added through Stripe.js, which posts only a `pm_` id) and payouts.

The add-card page is the only console page whose Content-Security-Policy lets Stripe.js
in: the card number is typed into Stripe's own frame and goes to Stripe; the broker gets
the resulting payment method id, exactly like the API.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from broker.console.access import Visitor, form, page
from broker.console.rendering import ConsoleRoute, render, see_other
from broker.console.security import Policy, origin_of
from broker.core.config import Settings
from broker.core.errors import BrokerError, NotFound, ValidationFailed
from broker.deps import EngineDep, SessionDep, VaultDep
from broker.payments import service
from broker.payments.platform import StripeAccess
from broker.payments.routes import FinanceManager, FinanceViewer, MethodId
from broker.payments.schemas import PaymentMethodAdd
from broker.settings.service import own_tenant

router = APIRouter(prefix="/console/payments", route_class=ConsoleRoute, include_in_schema=False)

PageViewer = Annotated[Visitor, page(FinanceViewer)]
PageManager = Annotated[Visitor, page(FinanceManager)]
FormManager = Annotated[Visitor, form(FinanceManager)]

DONE = {
    "added": "Card added.",
    "default": "Default card changed.",
    "removed": "Card removed.",
}


class StripeJsNotConfigured(BrokerError):
    """No publishable key: the add-card page cannot load Stripe.js."""

    status = 501
    title = "Not configured"


def _stripe(request: Request) -> StripeAccess:
    stripe: StripeAccess = request.app.state.stripe
    return stripe


def stripe_policy(settings: Settings) -> Policy:
    """Stripe.js, its frames and its API: on the add-card page only."""
    js = origin_of(settings.stripe_js_url)
    frames = (js, "https://hooks.stripe.com") if js == "https://js.stripe.com" else (js,)
    return Policy(scripts=(js,), frames=frames, connects=(origin_of(settings.stripe_api_base),))


@router.get("", name="console_payments")
def payments(
    request: Request, session: SessionDep, engine: EngineDep, vault: VaultDep, visitor: PageViewer
) -> Response:
    """Cards on file (brand, last 4, expiry, default) and the payout destination, masked."""
    tenant_id = own_tenant(visitor.principal)
    cards = service.list_methods(session, principal=visitor.principal, tenant_id=tenant_id)
    try:
        payout = service.get_payout(engine, vault, principal=visitor.principal, tenant_id=tenant_id)
    except NotFound:
        payout = None
    shown = payout if payout is not None and payout.payout_method else None
    return render(
        request,
        "payments/index.html",
        visitor=visitor,
        cards=cards,
        payout=shown,
        done=DONE.get(request.query_params.get("done") or ""),
        may_manage=visitor.may(FinanceManager),
    )


@router.get("/cards/new", name="console_add_card")
def add_card_page(request: Request, engine: EngineDep, visitor: PageManager) -> Response:
    """A SetupIntent for this tenant, and Stripe.js's card element to confirm it with."""
    settings: Settings = request.app.state.settings
    if not settings.stripe_publishable_key:
        raise StripeJsNotConfigured("Stripe.js is not configured (BROKER_STRIPE_PUBLISHABLE_KEY)")
    intent = service.create_setup_intent(
        engine,
        _stripe(request),
        principal=visitor.principal,
        tenant_id=own_tenant(visitor.principal),
    )
    return render(
        request,
        "payments/add_card.html",
        visitor=visitor,
        policy=stripe_policy(settings),
        stripe_js_url=settings.stripe_js_url,
        publishable_key=settings.stripe_publishable_key,
        # Meant for the browser: Stripe.js confirms the SetupIntent with it.
        client_secret=intent.client_secret,
    )


@router.post("/cards", name="console_save_card")
async def save_card(request: Request, engine: EngineDep, visitor: FormManager) -> Response:
    """Record the `pm_` id Stripe.js produced; the first card becomes the default."""
    posted = await request.form()
    try:
        body = PaymentMethodAdd(payment_method_id=str(posted.get("payment_method_id") or ""))
    except ValidationError:
        raise ValidationFailed("no card was confirmed with Stripe; try again") from None
    stripe = _stripe(request)
    await run_in_threadpool(
        lambda: service.add_method(
            engine,
            stripe,
            principal=visitor.principal,
            tenant_id=own_tenant(visitor.principal),
            payment_method_id=body.payment_method_id,
        )
    )
    return see_other("/console/payments?done=added")


@router.post("/cards/{method_id}/default", name="console_default_card")
def default_card(
    method_id: MethodId, request: Request, engine: EngineDep, visitor: FormManager
) -> Response:
    """Make this card the default (also the one Stripe Billing charges)."""
    service.set_default(
        engine,
        _stripe(request),
        principal=visitor.principal,
        tenant_id=own_tenant(visitor.principal),
        method_id=method_id,
    )
    return see_other("/console/payments?done=default")


@router.post("/cards/{method_id}/remove", name="console_remove_card")
def remove_card(
    method_id: MethodId, request: Request, engine: EngineDep, visitor: FormManager
) -> Response:
    """Detach the card in Stripe and forget it."""
    service.remove_method(
        engine,
        _stripe(request),
        principal=visitor.principal,
        tenant_id=own_tenant(visitor.principal),
        method_id=method_id,
    )
    return see_other("/console/payments?done=removed")
