"""Bootstrap of the broker's AppRole against a real OpenBao: what its tokens hold."""

from __future__ import annotations

from broker.devstack.openbao import OpenBaoServer
from broker.vault.bootstrap import BROKER_ROLE, bootstrap, issue_broker_credentials
from broker.vault.gateway import VaultGateway


def _token_policies(own_bao: OpenBaoServer, admin: VaultGateway) -> list[str]:
    """The policies of a token the broker gets by logging in with its AppRole."""
    role_id, secret_id = issue_broker_credentials(admin)
    broker = VaultGateway(addrs=[own_bao.addr], role_id=role_id, secret_id=secret_id)
    try:
        answer = broker.call("look up own token", lambda client: client.auth.token.lookup_self())
    finally:
        broker.close()
    return sorted(answer["data"]["policies"])


def test_broker_approle_tokens_hold_only_the_broker_policy(own_bao: OpenBaoServer) -> None:
    # Without "default", whose templated paths OpenBao parses again on every request.
    admin = VaultGateway(addrs=[own_bao.addr], token=own_bao.root_token)
    try:
        assert _token_policies(own_bao, admin) == ["broker"]
    finally:
        admin.close()


def test_bootstrap_takes_the_default_policy_off_an_existing_role(own_bao: OpenBaoServer) -> None:
    admin = VaultGateway(addrs=[own_bao.addr], token=own_bao.root_token)
    try:
        raw = admin._raw()
        # A role as an earlier bootstrap left it: its tokens got "default" as well.
        raw.auth.approle.create_or_update_approle(BROKER_ROLE, token_no_default_policy=False)
        assert _token_policies(own_bao, admin) == ["broker", "default"]
        report = bootstrap(admin)
        assert f"AppRole role {BROKER_ROLE}" in report.changed
        role = raw.auth.approle.read_role(BROKER_ROLE)["data"]
        assert role["token_no_default_policy"] is True
        assert role["token_policies"] == ["broker"]
        assert _token_policies(own_bao, admin) == ["broker"]
    finally:
        admin.close()
