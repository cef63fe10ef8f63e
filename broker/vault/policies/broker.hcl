# Policy: broker
#
# Held by: the broker service's own OpenBao token (one token per broker deployment).
# Why: the broker is the only component that reads or writes tenant credentials. It keeps them
# in the KV v2 mount "secret", encrypts with one Transit key per tenant, and hands secrets to
# services only inside response-wrapping tokens. It can touch nothing else: no mounts, no
# policies, no audit devices, no key export or backup, no KV path outside the two trees below.
#
# Path syntax reminders: "+" matches exactly one path segment; a trailing "*" matches any
# suffix, including further segments ("transit/keys/tenant-*" also matches
# "transit/keys/tenant-t1/rotate"). A "*" anywhere else is a literal character: OpenBao accepts
# "transit/keys/tenant-*/rotate" but it matches nothing, which is why rotate and config have
# no rule of their own.

# --- Tenant credentials (KV v2 mount "secret") -------------------------------------------
# secret/data/tenants/<tenant_id>/integrations/<provider>: OAuth/API credentials per provider.
# create = first write, update = later writes, patch = KV v2 PATCH, delete = soft-delete of
# the latest version.
path "secret/data/tenants/+/integrations/+" {
  capabilities = ["create", "read", "update", "patch", "delete"]
}

# secret/data/tenants/<tenant_id>/payout: the tenant's payout details.
path "secret/data/tenants/+/payout" {
  capabilities = ["create", "read", "update", "patch", "delete"]
}

# Metadata: read = version history; delete = remove every version (tenant offboarding).
path "secret/metadata/tenants/+/integrations/+" {
  capabilities = ["read", "delete"]
}

path "secret/metadata/tenants/+/payout" {
  capabilities = ["read", "delete"]
}

# Listing one tenant's providers (names only, no values), e.g. to offboard a tenant.
# The trailing slash matters: a LIST request's path ends in "/", and "+" also matches the
# empty segment after it, so without the slash the ".../integrations/+" rule above (no "list")
# would be the one applied.
path "secret/metadata/tenants/+/integrations/" {
  capabilities = ["list"]
}

# Listing one tenant's top-level items (integrations/, payout): key rotation rewraps and
# tenant deletion destroys everything a tenant has, so both must be able to find it all.
path "secret/metadata/tenants/+/" {
  capabilities = ["list"]
}

# Soft-delete / restore / permanently destroy specific versions.
path "secret/delete/tenants/+/integrations/+" {
  capabilities = ["update"]
}

path "secret/delete/tenants/+/payout" {
  capabilities = ["update"]
}

path "secret/undelete/tenants/+/integrations/+" {
  capabilities = ["update"]
}

path "secret/undelete/tenants/+/payout" {
  capabilities = ["update"]
}

path "secret/destroy/tenants/+/integrations/+" {
  capabilities = ["update"]
}

path "secret/destroy/tenants/+/payout" {
  capabilities = ["update"]
}

# --- Dynamic credentials: minted lease keys ---------------------------------------------------
# secret/data/tenants/<tenant_id>/leases/<lease_id>: the key minted for one service lease
# (broker/leases), sealed with the tenant's Transit key like its credentials. Written with
# check-and-set 0, rewritten only by a key rotation's rewrap (check-and-set again), read
# while the lease is live, destroyed with its metadata when revoked; never soft-deleted.
path "secret/data/tenants/+/leases/+" {
  capabilities = ["create", "read", "update"]
}

path "secret/metadata/tenants/+/leases/+" {
  capabilities = ["read", "delete"]
}

path "secret/metadata/tenants/+/leases/" {
  capabilities = ["list"]
}

# --- Webhook signing secrets ---------------------------------------------------------------
# secret/data/webhooks/<endpoint id>: the whsec_ secret of one registered webhook endpoint.
# Written once at registration (create), read to sign each delivery; the metadata delete
# removes every version when the endpoint is deleted.
path "secret/data/webhooks/+" {
  capabilities = ["create", "read"]
}

path "secret/metadata/webhooks/+" {
  capabilities = ["delete"]
}

# --- Platform secrets (read-only) ----------------------------------------------------------
# secret/data/platform/<name>, e.g. platform/stripe: the platform's own API keys. Written by
# operators with their own tokens; the broker only reads them.
path "secret/data/platform/*" {
  capabilities = ["read"]
}

# --- Per-tenant Transit keys (mount "transit") ---------------------------------------------
# transit/keys/tenant-<tenant_id>:
#   update = create the key (POST) and, through the glob, keys/tenant-<id>/rotate and
#            keys/tenant-<id>/config (min_decryption_version, deletion_allowed);
#   read   = key metadata (versions; never key material);
#   delete = delete the key (only possible after config sets deletion_allowed).
# The glob also matches keys/tenant-<id>/trim. That cannot be carved out: OpenBao applies the
# single most specific matching rule, and "transit/keys/+/trim" ranks *below*
# "transit/keys/tenant-*" because its first wildcard comes earlier. Trim destroys nothing that
# "delete" above could not already destroy.
path "transit/keys/tenant-*" {
  capabilities = ["read", "update", "delete"]
}

# Encrypt/decrypt/rewrap with a tenant key. Only "update": without "create", encrypting with a
# key that does not exist is denied instead of silently creating the key.
path "transit/encrypt/tenant-*" {
  capabilities = ["update"]
}

path "transit/decrypt/tenant-*" {
  capabilities = ["update"]
}

path "transit/rewrap/tenant-*" {
  capabilities = ["update"]
}

# --- System endpoints ----------------------------------------------------------------------
# Wrap a secret into a single-use token that a service unwraps (see service-reader.hcl).
path "sys/wrapping/wrap" {
  capabilities = ["update"]
}

# HMAC a value the way the audit device does, to correlate broker logs with the audit log.
path "sys/audit-hash/*" {
  capabilities = ["update"]
}

# The broker's own token. The "default" policy grants these too, but the broker's AppRole tokens
# carry no default policy (bootstrap sets token_no_default_policy), so they are listed here.
path "auth/token/lookup-self" {
  capabilities = ["read"]
}

path "auth/token/renew-self" {
  capabilities = ["update"]
}

# sys/health is unauthenticated: no rule needed.

