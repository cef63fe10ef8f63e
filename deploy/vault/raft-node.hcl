# HashiCorp Vault: one node of a 3-node raft cluster, for PRODUCTION.
#
# The Vault equivalent of deploy/openbao/raft-node.hcl. The same file on every node; three
# values differ per node and come from the environment (they override the lines marked
# PER NODE below):
#
#   node   VAULT_RAFT_NODE_ID   VAULT_API_ADDR                          VAULT_CLUSTER_ADDR
#   0      vault-0              https://vault-0.vault-internal:8200     https://vault-0.vault-internal:8201
#   1      vault-1              https://vault-1.vault-internal:8200     https://vault-1.vault-internal:8201
#   2      vault-2              https://vault-2.vault-internal:8200     https://vault-2.vault-internal:8201
#
# Host names are those of the official Helm chart (StatefulSet "vault", headless Service
# "vault-internal"); see deploy/helm/vault-values.yaml for the same cluster on Kubernetes.
# Put all three (and the client-facing name) in the certificate's subjectAltName.
#
# Files every node needs:
#   /vault/tls/tls.crt, tls.key   the node's certificate (chain) and key
#   /vault/tls/ca.crt             the CA that signed every node's certificate
#   /vault/data                   raft storage (a persistent volume per node)
#   /vault/audit                  the file audit device (a persistent volume per node)
#
# AUDIT DEVICES. Unlike OpenBao, Vault has no audit stanza in its configuration: audit devices
# are enabled once, through the API, and raft replicates them to every node. Right after
# `vault operator init` and unseal, with the root token, enable two (Vault refuses any request
# it cannot audit, so with a single device a full disk stops everything):
#
#   vault audit enable -path=file   file file_path=/vault/audit/audit.log
#   vault audit enable -path=stdout file file_path=stdout
#
# `broker bootstrap` then reports a warning if fewer than two audit devices are enabled.

ui = false

# Recommended with integrated storage: raft's memory-mapped files do not mix with mlock.
# (Disable swap on the host instead.)
disable_mlock = true

storage "raft" {
  path    = "/vault/data"
  node_id = "vault-0" # PER NODE (VAULT_RAFT_NODE_ID)

  # 1 is the production value (the default, 5, suits small dev machines): a dead leader is
  # replaced in seconds. The broker rides out the election with retries and 503s.
  performance_multiplier = 1

  retry_join {
    leader_api_addr       = "https://vault-0.vault-internal:8200"
    leader_ca_cert_file   = "/vault/tls/ca.crt"
    leader_tls_servername = "vault-0.vault-internal"
  }
  retry_join {
    leader_api_addr       = "https://vault-1.vault-internal:8200"
    leader_ca_cert_file   = "/vault/tls/ca.crt"
    leader_tls_servername = "vault-1.vault-internal"
  }
  retry_join {
    leader_api_addr       = "https://vault-2.vault-internal:8200"
    leader_ca_cert_file   = "/vault/tls/ca.crt"
    leader_tls_servername = "vault-2.vault-internal"
  }
}

listener "tcp" {
  address         = "0.0.0.0:8200"
  cluster_address = "0.0.0.0:8201"
  tls_disable     = false
  tls_cert_file   = "/vault/tls/tls.crt"
  tls_key_file    = "/vault/tls/tls.key"
  tls_min_version = "tls12"
}

api_addr     = "https://vault-0.vault-internal:8200" # PER NODE (VAULT_API_ADDR)
cluster_addr = "https://vault-0.vault-internal:8201" # PER NODE (VAULT_CLUSTER_ADDR)

# Auto-unseal (recommended in production). For example:
# seal "awskms" {
#   region     = "eu-west-1"
#   kms_key_id = "alias/vault-unseal"
# }

telemetry {
  prometheus_retention_time = "30s"
  disable_hostname          = true
}
