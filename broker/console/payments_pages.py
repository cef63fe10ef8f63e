"""Payments pages: cards (added through Stripe.js, which posts only a `pm_` id) and payouts.

The add-card page is the only console page whose Content-Security-Policy lets Stripe.js
in: the card number is typed into Stripe's own frame and goes to Stripe; the broker gets
the resulting payment method id, exactly like the API.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, get_args, get_origin

from fastapi import APIRouter, Request
from pydantic import SecretStr, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from broker.auth.dependencies import own_tenant
from broker.console import forms
from broker.console.access import Visitor, form, page
from broker.console.rendering import ConsoleRoute, render, see_other
from broker.console.security import Policy, origin_of
from broker.core.config import Settings
from broker.core.errors import BrokerError, NotFound, ValidationFailed
from broker.deps import EngineDep, SessionDep, VaultDep, stripe_of
from broker.payments import service
from broker.payments.payout import DETAILS_MODELS, parse_details
from broker.payments.platform import StripeAccess
from broker.payments.routes import FinanceManager, FinanceViewer, MethodId
from broker.payments.schemas import PaymentMethodAdd
from broker.tenants import service as tenants

router = APIRouter(prefix="/console/payments", route_class=ConsoleRoute, include_in_schema=False)

PageViewer = Annotated[Visitor, page(FinanceViewer)]
PageManager = Annotated[Visitor, page(FinanceManager)]
FormManager = Annotated[Visitor, form(FinanceManager)]

DONE = {
    "added": "Card added.",
    "default": "Default card changed.",
    "removed": "Card removed.",
    "payout": "Payout destination saved.",
}


@dataclass(frozen=True)
class PayoutField:
    """One input of a payout method: secret ones are never put back into the form."""

    name: str
    label: str
    secret: bool
    required: bool
    options: tuple[str, ...] = ()


def payout_fields(method: str) -> list[PayoutField]:
    """The inputs of a payout method, read off its details model."""
    found = []
    for name, info in DETAILS_MODELS[method].model_fields.items():
        bare, _, optional = forms.unwrap(info.annotation)
        options = tuple(str(o) for o in get_args(bare)) if get_origin(bare) is Literal else ()
        found.append(
            PayoutField(
                name=name,
                label=forms.label_of(name).replace("Iban", "IBAN").replace("Bic", "BIC"),
                secret=bare is SecretStr,
                required=not optional and info.is_required(),
                options=options,
            )
        )
    return found


class StripeJsNotConfigured(BrokerError):
    """No publishable key: the add-card page cannot load Stripe.js."""

    status = 501
    title = "Not configured"


def _stripe(request: Request) -> StripeAccess:
    return stripe_of(request)


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


@router.get("/payout", name="console_payout")
def payout_page(request: Request, visitor: PageManager) -> Response:
    """The payout destination form: one method, its details (sealed in Vault on save)."""
    return _payout_form(request, visitor, method=None, errors={})


def _payout_form(
    request: Request, visitor: Visitor, *, method: str | None, errors: dict[str, str]
) -> Response:
    return render(
        request,
        "payments/payout.html",
        visitor=visitor,
        status=422 if errors else 200,
        methods=[(m, forms.label_of(m), payout_fields(m)) for m in DETAILS_MODELS],
        chosen=method,
        errors=errors,
    )


@router.post("/payout", name="console_save_payout")
async def save_payout(
    request: Request, engine: EngineDep, vault: VaultDep, visitor: FormManager
) -> Response:
    """Validate and seal the chosen method's details; the page then shows the masked hint."""
    posted = await request.form()
    method = str(posted.get("method") or "")
    if method not in DETAILS_MODELS:
        return _payout_form(request, visitor, method=None, errors={"method": "choose a method"})
    details = {
        field.name: value
        for field in payout_fields(method)
        if isinstance(value := posted.get(f"{method}.{field.name}"), str) and value.strip()
    }
    tenant_id = own_tenant(visitor.principal)

    def store() -> None:
        tenants.require_live(engine, tenant_id=tenant_id)
        service.put_payout(
            engine,
            vault,
            principal=visitor.principal,
            tenant_id=tenant_id,
            method=method,
            details=parse_details(method, details),
        )

    try:
        await run_in_threadpool(store)
    except ValidationFailed as invalid:
        errors = {
            f"{method}.{str(e.get('field', '')).removeprefix('details.')}": str(e.get("message"))
            for e in invalid.extra.get("errors") or []
        } or {"method": invalid.message}
        return _payout_form(request, visitor, method=method, errors=errors)
    return see_other("/console/payments?done=payout")


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
