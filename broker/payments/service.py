"""Payment-method references and payout details (PCI-DSS: tokens and hints only).

Every read and write of a payment method or payout destination is recorded in
the broker's audit trail with the method's id, never card data (PCI DSS 10.2).

Stripe calls and database writes are ordered so a failure on either side
leaves nothing half-done: a card is attached only inside the transaction that
records it, and detached again if that transaction cannot commit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Engine, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlmodel import Session, col, select

from broker.audit import trail
from broker.auth.principal import Principal
from broker.core.db import unit_of_work
from broker.core.errors import BrokerError, Conflict, NotFound
from broker.models import PaymentMethod, PaymentProfile, Tenant, utcnow
from broker.payments.payout import PayoutDetails
from broker.payments.platform import StripeAccess
from broker.payments.stripe_gateway import SetupIntentInfo
from broker.vault.errors import VaultUnavailable, WriteOutcomeUnknown
from broker.vault.gateway import VaultGateway
from broker.vault.sealed import SealedStore

log = logging.getLogger(__name__)

PAYOUT_ITEM = "payout"
T = TypeVar("T")


def default_payment_method(methods: Sequence[PaymentMethod]) -> PaymentMethod | None:
    """The seed's rule: the method marked default, else the first, else none."""
    for method in methods:
        if method.is_default:
            return method
    return methods[0] if methods else None


def list_methods(session: Session, *, principal: Principal, tenant_id: str) -> list[PaymentMethod]:
    """The tenant's card references, oldest first (the read is audited)."""
    _live_tenant(session, tenant_id)
    methods = _methods(session, tenant_id)
    trail.record(
        session,
        action="payment_method.list",
        resource=f"tenants/{tenant_id}/payment-methods",
        outcome="success",
        principal=principal,
        tenant_id=tenant_id,
        detail={"payment_methods": [m.id for m in methods]},
    )
    return methods


def create_setup_intent(
    engine: Engine, stripe: StripeAccess, *, principal: Principal, tenant_id: str
) -> SetupIntentInfo:
    """A SetupIntent for Stripe.js to tokenize a card; the broker never sees the card."""
    customer_id = _ensure_customer(engine, stripe, tenant_id=tenant_id)
    return _audited(
        engine,
        principal,
        tenant_id,
        "payment_method.setup_intent",
        lambda: stripe.gateway().create_setup_intent(customer_id=customer_id),
        detail={"customer": customer_id},
    )


def add_method(
    engine: Engine,
    stripe: StripeAccess,
    *,
    principal: Principal,
    tenant_id: str,
    payment_method_id: str,
) -> PaymentMethod:
    """Verify a pm_ reference is a card, attach it to the tenant's customer, record it."""
    customer_id = _ensure_customer(engine, stripe, tenant_id=tenant_id)
    gateway = stripe.gateway()
    attached = False
    try:
        with unit_of_work(engine) as session:
            _live_tenant(session, tenant_id)
            if session.get(PaymentMethod, (tenant_id, payment_method_id)) is not None:
                raise Conflict("this payment method is already on file")
            gateway.retrieve_card(payment_method_id)
            card = gateway.attach(payment_method_id, customer_id=customer_id)
            attached = True
            first = not _methods(session, tenant_id, lock=True)
            method = PaymentMethod(
                tenant_id=tenant_id,
                id=card.id,
                brand=card.brand,
                last4=card.last4,
                exp_month=card.exp_month,
                exp_year=card.exp_year,
                is_default=first,
                created_by=principal.actor,
            )
            session.add(method)
            session.flush()
            if first:
                # Stripe Billing charges the invoice default: it must be the broker's default.
                gateway.set_default_card(customer_id, card.id)
            _record(session, principal, tenant_id, "payment_method.add", card.id, "success")
        return method
    except BrokerError as exc:
        if attached:
            # The row never committed: undo the attachment so Stripe matches us.
            try:
                gateway.detach(payment_method_id, customer_id=customer_id)
            except BrokerError:
                pass
        _record_failure(engine, principal, tenant_id, "payment_method.add", payment_method_id, exc)
        raise


def _tenant_methods(
    session: Session, tenant_id: str, method_id: str
) -> tuple[list[PaymentMethod], PaymentMethod]:
    """A live tenant's cards, locked for a change, and the one named (NotFound if none)."""
    _live_tenant(session, tenant_id)
    methods = _methods(session, tenant_id, lock=True)
    named = next((m for m in methods if m.id == method_id), None)
    if named is None:
        raise NotFound("no such payment method")
    return methods, named


def set_default(
    engine: Engine, stripe: StripeAccess, *, principal: Principal, tenant_id: str, method_id: str
) -> PaymentMethod:
    """Make one card the default, here and as the Stripe customer's invoice default."""
    try:
        with unit_of_work(engine) as session:
            methods, chosen = _tenant_methods(session, tenant_id, method_id)
            for method in methods:
                if method.is_default and method is not chosen:
                    method.is_default = False
                    session.add(method)
            session.flush()  # clear the old default before setting the new one (unique index)
            chosen.is_default = True
            session.add(chosen)
            session.flush()
            # Inside the transaction: if Stripe refuses, the broker's default stays too.
            # Should the commit fail after Stripe agreed, reconciliation puts Stripe back.
            profile = session.get(PaymentProfile, tenant_id)
            if profile is not None and profile.stripe_customer_id:
                stripe.gateway().set_default_card(profile.stripe_customer_id, method_id)
            _record(
                session, principal, tenant_id, "payment_method.set_default", method_id, "success"
            )
        return chosen
    except BrokerError as exc:
        _record_failure(engine, principal, tenant_id, "payment_method.set_default", method_id, exc)
        raise


def reconcile_default_card(engine: Engine, stripe: StripeAccess, *, tenant_id: str) -> bool:
    """Make Stripe's invoice default the broker's default card; True when they differed.

    The broker holds the tenant's choice; Stripe's copy can drift (a commit lost after
    Stripe agreed, a dashboard edit), and Billing would then charge another card.
    """
    with unit_of_work(engine) as session:
        profile = session.get(PaymentProfile, tenant_id)
        if profile is None or not profile.stripe_customer_id:
            return False
        customer_id = profile.stripe_customer_id
        chosen = default_payment_method(_methods(session, tenant_id))
    wanted = chosen.id if chosen else None
    gateway = stripe.gateway()
    found = gateway.default_card(customer_id)
    if found == wanted:
        return False
    gateway.set_default_card(customer_id, wanted)
    log.warning(
        "Stripe's default card differed from the broker's; Stripe was corrected",
        extra={"fields": {"tenant": tenant_id, "stripe_default": found, "default": wanted}},
    )
    return True


def _live_tenants_where(engine: Engine, condition: ColumnElement[bool]) -> list[str]:
    """Tenants not being deleted whose payment profile meets `condition`, in id order."""
    with unit_of_work(engine) as session:
        return list(
            session.exec(
                select(PaymentProfile.tenant_id)
                .join(Tenant, col(Tenant.id) == col(PaymentProfile.tenant_id))
                .where(condition)
                .where(col(Tenant.deleting_at).is_(None))
                .order_by(col(PaymentProfile.tenant_id))
            )
        )


def reconcile_default_cards(engine: Engine, stripe: StripeAccess) -> int:
    """Reconcile every live tenant with a Stripe customer; returns how many differed."""
    tenant_ids = _live_tenants_where(engine, col(PaymentProfile.stripe_customer_id).is_not(None))
    differed = 0
    for tenant_id in tenant_ids:
        try:
            differed += reconcile_default_card(engine, stripe, tenant_id=tenant_id)
        except BrokerError as exc:
            # One tenant's customer (deleted in Stripe, say) must not stop the others.
            log.warning(
                "could not reconcile the default card",
                extra={"fields": {"tenant": tenant_id, "error": type(exc).__name__}},
            )
    return differed


def remove_method(
    engine: Engine, stripe: StripeAccess, *, principal: Principal, tenant_id: str, method_id: str
) -> None:
    """Detach the card in Stripe and forget it; the default moves to the oldest remaining."""
    try:
        with unit_of_work(engine) as session:
            methods, doomed = _tenant_methods(session, tenant_id, method_id)
            session.delete(doomed)
            session.flush()
            rest = [m for m in methods if m is not doomed]
            if doomed.is_default and rest:
                rest[0].is_default = True
                session.add(rest[0])
            profile = session.get(PaymentProfile, tenant_id)
            customer_id = profile.stripe_customer_id if profile else None
            gateway = stripe.gateway()
            # The new default first: a detach cannot be undone, so it comes last, and a
            # failure before it leaves at worst a Stripe default the hourly reconcile resets.
            if doomed.is_default and rest and customer_id:
                gateway.set_default_card(customer_id, rest[0].id)
            gateway.detach(method_id, customer_id=customer_id)
            _record(session, principal, tenant_id, "payment_method.remove", method_id, "success")
    except BrokerError as exc:
        _record_failure(engine, principal, tenant_id, "payment_method.remove", method_id, exc)
        raise


def get_payout(
    engine: Engine, vault: VaultGateway, *, principal: Principal, tenant_id: str
) -> PaymentProfile:
    """The masked payout view (the read is audited); reconciled with Vault if pending."""
    with unit_of_work(engine) as session:
        _live_tenant(session, tenant_id)
        profile = session.get(PaymentProfile, tenant_id, with_for_update=True)
        if profile is not None and profile.payout_sync_pending:
            try:
                _reconcile_payout(profile, SealedStore(vault))
            except VaultUnavailable:
                pass  # shown as last known; the next reader tries again
            session.add(profile)
        if profile is None or profile.payout_method is None:
            raise NotFound("no payout destination is set")
        trail.record(
            session,
            action="payout.read",
            resource=f"tenants/{tenant_id}/payout",
            outcome="success",
            principal=principal,
            tenant_id=tenant_id,
            detail={"method": profile.payout_method},
        )
        return profile


def put_payout(
    engine: Engine,
    vault: VaultGateway,
    *,
    principal: Principal,
    tenant_id: str,
    method: str,
    details: PayoutDetails,
) -> PaymentProfile:
    """Seal payout details in Vault; PostgreSQL keeps only the method and a masked hint.

    Same protocol as integration credentials (see `broker.integrations.service`):
    mark pending (commit), write Vault with check-and-set, then record the new
    version and clear the mark. A refused write clears the mark; an unanswered
    one keeps it until Vault shows the outcome; a retry whose details Vault
    already holds succeeds without a second write.
    """
    store = SealedStore(vault)
    secrets = details.secret_values()
    public = {"method": method, "hint": details.masked_hint(), "updated_by": principal.actor}
    ciphertext = store.seal(tenant_id, PAYOUT_ITEM, secrets, public)
    mark = _mark_payout_pending(engine, store, principal, tenant_id, method, secrets)
    if isinstance(mark, PaymentProfile):
        return mark  # a retry whose details Vault already holds
    try:
        version = store.write(
            tenant_id, PAYOUT_ITEM, ciphertext=ciphertext, public=public, cas=mark.cas
        )
    except WriteOutcomeUnknown:
        _keep_payout_pending(engine, tenant_id, mark.cas)
        raise
    except Conflict:
        settled = _try_reconcile_payout(engine, store, tenant_id)
        if settled is not None and _payout_holds(store, tenant_id, method, secrets):
            with unit_of_work(engine) as session:
                _record_payout(session, principal, tenant_id, method, settled.payout_version, True)
            return _payout_view(settled)
        raise
    except BrokerError:
        _clear_refused_mark(engine, store, tenant_id, mark)
        raise
    return _record_written_payout(
        engine, store, principal, tenant_id, method, version=version, public=public
    )


@dataclass(frozen=True)
class _PayoutMark:
    """A payout write marked pending: the version to check-and-set against, and whether
    the mark was another write's, left unresolved, that this one took over."""

    cas: int
    inherited: bool


def _mark_payout_pending(
    engine: Engine,
    store: SealedStore,
    principal: Principal,
    tenant_id: str,
    method: str,
    secrets: dict[str, str],
) -> _PayoutMark | PaymentProfile:
    """Mark the profile pending (committed), or answer at once when an earlier unanswered
    write of these very details turns out to have landed."""
    with unit_of_work(engine) as session:
        _live_tenant(session, tenant_id)
        profile = _profile(session, tenant_id)
        inherited = False
        if profile.payout_sync_pending:
            moved = _reconcile_payout(profile, store)
            inherited = not moved
            if moved and _payout_holds(store, tenant_id, method, secrets):
                session.add(profile)
                _record_payout(session, principal, tenant_id, method, profile.payout_version, True)
                return _payout_view(profile)
        profile.payout_sync_pending = True
        session.add(profile)
        return _PayoutMark(cas=profile.payout_version, inherited=inherited)


def _clear_refused_mark(
    engine: Engine, store: SealedStore, tenant_id: str, mark: _PayoutMark
) -> None:
    """Vault refused the write: clear this write's mark (an inherited one is settled from
    what Vault holds instead)."""
    if mark.inherited:
        _try_reconcile_payout(engine, store, tenant_id)
        return
    with unit_of_work(engine) as session:
        profile = _profile(session, tenant_id)
        if profile.payout_version == mark.cas:
            profile.payout_sync_pending = False
            session.add(profile)


def _record_written_payout(
    engine: Engine,
    store: SealedStore,
    principal: Principal,
    tenant_id: str,
    method: str,
    *,
    version: int,
    public: dict[str, str],
) -> PaymentProfile:
    """Record the version Vault took and clear the mark (unless a newer write got there)."""
    try:
        with unit_of_work(engine) as session:
            profile = _profile(session, tenant_id)
    except NotFound:
        # The tenant was deleted while this write was in Vault, and its shredding may have
        # run before the write landed: destroy what the write left, or it outlives the tenant.
        store.destroy(tenant_id, PAYOUT_ITEM)
        raise
    with unit_of_work(engine) as session:
        profile = _profile(session, tenant_id)
        if version >= profile.payout_version:
            _describe_payout(profile, version, public)
            profile.payout_sync_pending = False
            session.add(profile)
        _record_payout(session, principal, tenant_id, method, version, False)
        # The answer describes this write, even when a concurrent one is newer.
        own = _payout_view(profile)
        _describe_payout(own, version, public)
        return own


def _record_payout(
    session: Session,
    principal: Principal,
    tenant_id: str,
    method: str,
    version: int,
    already_applied: bool,
) -> None:
    detail: dict[str, Any] = {"method": method, "kv_version": version}
    if already_applied:
        detail["already_applied"] = True  # an earlier, unanswered attempt had landed
    trail.record(
        session,
        action="payout.update",
        resource=f"tenants/{tenant_id}/payout",
        outcome="success",
        principal=principal,
        tenant_id=tenant_id,
        detail=detail,
    )


def _describe_payout(profile: PaymentProfile, version: int, public: dict[str, Any]) -> None:
    profile.payout_method = str(public.get("method") or "") or None
    profile.payout_hint = str(public.get("hint") or "") or None
    profile.payout_version = version
    profile.payout_updated_at = utcnow()
    profile.payout_updated_by = public.get("updated_by")


def _payout_view(profile: PaymentProfile) -> PaymentProfile:
    """A detached copy, for an answer that must not change with the row."""
    copy = PaymentProfile.model_validate(profile.model_dump())
    copy.payout_sync_pending = False
    return copy


def _keep_payout_pending(engine: Engine, tenant_id: str, cas: int) -> None:
    """The write may still land: keep its mark (or put it back, should a key rotation
    have cleared it meanwhile) until Vault shows whether it did."""
    try:
        with unit_of_work(engine) as session:
            profile = _profile(session, tenant_id)
            if profile.payout_version <= cas:
                profile.payout_sync_pending = True
                session.add(profile)
    except BrokerError:
        log.warning("could not keep an unconfirmed payout write marked; its mark stands")


def _payout_holds(store: SealedStore, tenant_id: str, method: str, secrets: dict[str, str]) -> bool:
    """True when Vault's current payout details are exactly these."""
    record = store.read(tenant_id, PAYOUT_ITEM)
    if record is None or record.public.get("method") != method:
        return False
    return store.open(tenant_id, PAYOUT_ITEM, record) == secrets


def _try_reconcile_payout(
    engine: Engine, store: SealedStore, tenant_id: str
) -> PaymentProfile | None:
    """Best effort: make the profile match Vault now; leave it pending if Vault is down."""
    try:
        with unit_of_work(engine) as session:
            profile = _profile(session, tenant_id)
            if profile.payout_sync_pending:
                _reconcile_payout(profile, store)
                session.add(profile)
            return profile
    except BrokerError:
        return None


# -- helpers ----------------------------------------------------------------------


def _ensure_customer(engine: Engine, stripe: StripeAccess, *, tenant_id: str) -> str:
    """The tenant's Stripe customer, created on first use (idempotent per tenant)."""
    with unit_of_work(engine) as session:
        tenant = _live_tenant(session, tenant_id)
        profile = _profile(session, tenant_id)
        if profile.stripe_customer_id:
            return profile.stripe_customer_id
        # Stripe's idempotency key is derived from the tenant id, so a retry after
        # a lost commit gets the same customer back instead of a second one.
        profile.stripe_customer_id = stripe.gateway().create_customer(
            tenant_id=tenant_id, name=tenant.name
        )
        session.add(profile)
        return profile.stripe_customer_id


def mark_payouts_pending(session: Session, tenant_ids: Collection[str]) -> set[str]:
    """Mark the payout records of `tenant_ids` pending before a key rotation rewrites them
    (in `session`); returns the tenants whose record this marked.

    A tenant without a record, or whose record another write marked already, is left
    out: that mark stays that write's own.
    """
    marked = session.execute(
        update(PaymentProfile)
        .where(
            col(PaymentProfile.tenant_id).in_(tenant_ids),
            col(PaymentProfile.payout_version) > 0,
            col(PaymentProfile.payout_sync_pending).is_(False),
        )
        .values(payout_sync_pending=True)
        .returning(col(PaymentProfile.tenant_id))
    )
    return set(marked.scalars())


def settle_rewrapped_payouts(
    session: Session, moves: Mapping[str, tuple[int, int]], marked: Collection[str]
) -> set[str]:
    """Move each payout record a key rotation rewrote from KV version `before` to `after`
    (`moves`: tenant -> (before, after)), clearing the marks the rotation set (`marked`).

    A rewrap changes the wrapping, not the details, their hint or their age: only the
    version moves. Returns the tenants whose record holds another version (a write
    raced the rotation) or carries another write's mark: those are for
    `reconcile_payout`, which reads what Vault holds.
    """
    profiles = session.exec(
        select(PaymentProfile)
        .where(col(PaymentProfile.tenant_id).in_(list(moves)))
        .with_for_update()
    )
    raced: set[str] = set()
    for profile in profiles:
        before, after = moves[profile.tenant_id]
        others_mark = profile.payout_sync_pending and profile.tenant_id not in marked
        if profile.payout_version != before or others_mark:
            raced.add(profile.tenant_id)
            continue
        profile.payout_version = after
        profile.payout_sync_pending = False
        session.add(profile)
    return raced


def reconcile_payout(engine: Engine, vault: VaultGateway, *, tenant_id: str, marked: bool) -> None:
    """Rebuild the payout record from Vault after a key rotation.

    Every write of the rotation was answered by now, so the rotation's own mark
    (`marked`) is cleared even when Vault shows nothing new; another write's mark is
    left to that write.
    """
    store = SealedStore(vault)
    with unit_of_work(engine) as session:
        profile = session.get(PaymentProfile, tenant_id, with_for_update=True)
        if profile is None or not profile.payout_sync_pending:
            return
        if not _reconcile_payout(profile, store) and marked:
            profile.payout_sync_pending = False
        session.add(profile)


def reconcile_pending_payouts(engine: Engine, vault: VaultGateway) -> int:
    """Reconcile every live tenant's pending payout record; returns how many were pending."""
    tenant_ids = _live_tenants_where(engine, col(PaymentProfile.payout_sync_pending).is_(True))
    store = SealedStore(vault)
    for tenant_id in tenant_ids:
        _try_reconcile_payout(engine, store, tenant_id)
    return len(tenant_ids)


def _reconcile_payout(profile: PaymentProfile, store: SealedStore) -> bool:
    """Rebuild a pending profile from Vault; False when Vault shows nothing new (see
    `broker.integrations.service._reconcile`: an unanswered write may yet land)."""
    version, live = store.current_version(profile.tenant_id, PAYOUT_ITEM)
    if version == profile.payout_version and live == (profile.payout_method is not None):
        return False
    record = store.read(profile.tenant_id, PAYOUT_ITEM) if live else None
    if record is not None:
        store.open(profile.tenant_id, PAYOUT_ITEM, record)  # adopt only a hint that verifies
        profile.payout_method = str(record.public.get("method") or "") or None
        profile.payout_hint = str(record.public.get("hint") or "") or None
        profile.payout_updated_by = record.public.get("updated_by")
        profile.payout_updated_at = utcnow()
    else:
        profile.payout_method = profile.payout_hint = None
    profile.payout_version = version
    profile.payout_sync_pending = False
    return True


def _profile(session: Session, tenant_id: str) -> PaymentProfile:
    # The tenant may have been deleted since the request began (its rows with it): held
    # in key-share mode, it stays until this transaction ends, and the insert has its key.
    if session.get(Tenant, tenant_id, with_for_update={"key_share": True}) is None:
        raise NotFound("no such tenant")
    # Concurrent first requests (payout writes, a setup intent) race to create the row;
    # let PostgreSQL pick one, so the others wait on its lock instead of failing on the key.
    session.execute(
        pg_insert(PaymentProfile)
        .values(tenant_id=tenant_id, payout_version=0, payout_sync_pending=False)
        .on_conflict_do_nothing()
    )
    profile = session.get(PaymentProfile, tenant_id, with_for_update=True)
    if profile is None:  # inserted above, or by a concurrent request: never absent
        raise RuntimeError(f"no payment profile row for {tenant_id} after inserting it")
    return profile


def _methods(session: Session, tenant_id: str, *, lock: bool = False) -> list[PaymentMethod]:
    query = (
        select(PaymentMethod)
        .where(PaymentMethod.tenant_id == tenant_id)
        .order_by(col(PaymentMethod.created_at), col(PaymentMethod.id))
    )
    if lock:
        query = query.with_for_update()
    return list(session.exec(query))


def _live_tenant(session: Session, tenant_id: str) -> Tenant:
    tenant = session.get(Tenant, tenant_id)
    if tenant is None or tenant.deleting_at is not None:
        raise NotFound("no such tenant")
    return tenant


def _record(
    session: Session,
    principal: Principal,
    tenant_id: str,
    action: str,
    method_id: str,
    outcome: trail.Outcome,
    **detail: Any,
) -> None:
    trail.record(
        session,
        action=action,
        resource=f"tenants/{tenant_id}/payment-methods/{method_id}",
        outcome=outcome,
        principal=principal,
        tenant_id=tenant_id,
        detail={"payment_method": method_id, **detail},
    )


def _record_failure(
    engine: Engine,
    principal: Principal,
    tenant_id: str,
    action: str,
    method_id: str,
    exc: BrokerError,
) -> None:
    trail.record_separately(
        engine,
        action=action,
        resource=f"tenants/{tenant_id}/payment-methods/{method_id}",
        outcome="failed",
        principal=principal,
        tenant_id=tenant_id,
        detail={"payment_method": method_id, "status": exc.status, "reason": exc.message},
    )


def _audited(
    engine: Engine,
    principal: Principal,
    tenant_id: str,
    action: str,
    call: Callable[[], T],
    *,
    detail: dict[str, Any],
) -> T:
    try:
        result = call()
    except BrokerError as exc:
        trail.record_separately(
            engine,
            action=action,
            resource=f"tenants/{tenant_id}/payment-methods",
            outcome="failed",
            principal=principal,
            tenant_id=tenant_id,
            detail={**detail, "status": exc.status},
        )
        raise
    trail.record_separately(
        engine,
        action=action,
        resource=f"tenants/{tenant_id}/payment-methods",
        outcome="success",
        principal=principal,
        tenant_id=tenant_id,
        detail=detail,
    )
    return result
