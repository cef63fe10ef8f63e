# Policy: security-auditor
#
# Held by: the security team (humans or their tooling) reviewing the OpenBao audit log.
# Why: audit log entries contain HMACs of secrets and tokens, not the values. An auditor who
# holds a suspect value (e.g. a leaked API key) can compute its HMAC with the same device and
# search the log for it, and can see how auditing is configured. Nothing here reads a secret,
# decrypts, or changes configuration.

# Compute the audit device's HMAC of a given input: sys/audit-hash/<device path>.
path "sys/audit-hash/*" {
  capabilities = ["update"]
}

# List enabled audit devices. OpenBao treats sys/audit as a root-protected path: "read" alone
# is denied, "sudo" is required as well. (Enabling/disabling devices needs create/update/delete
# on sys/audit/<path>, which is not granted; OpenBao only takes them from the config file.)
path "sys/audit" {
  capabilities = ["read", "sudo"]
}

# Which request headers the audit devices record. Also root-protected, hence "sudo".
path "sys/config/auditing/request-headers" {
  capabilities = ["read", "sudo"]
}
