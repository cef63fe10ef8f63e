# Policy: service-reader
#
# Held by: the internal services that use tenant credentials (sync workers, payout jobs, ...).
# Why: services never read KV or use Transit directly. The broker checks the caller's scopes,
# then returns the secret inside a response-wrapping token; the service can only inspect that
# token and unwrap it (once). Everything else is denied.
#
# Note: unwrapping with the wrapping token itself as X-Vault-Token needs no policy at all, and
# sys/wrapping/lookup is unauthenticated. The rules below let a service do both while
# authenticated with its own token (token in the request body), which puts the service's
# identity in the audit log; without the unwrap rule that request is denied.

# Exchange a wrapping token for the secret it holds (single use).
path "sys/wrapping/unwrap" {
  capabilities = ["update"]
}

# Check a wrapping token (creation path, TTL) before unwrapping it, to detect tampering.
path "sys/wrapping/lookup" {
  capabilities = ["update"]
}
