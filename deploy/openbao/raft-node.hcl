# OpenBao: one node of a 3-node raft cluster, for PRODUCTION.
#
# The same file on every node. Three values differ per node; give each node its own through
# the environment (they override the lines marked PER NODE below):
#
#   node   BAO_RAFT_NODE_ID   BAO_API_ADDR                                BAO_CLUSTER_ADDR
#   0      openbao-0          https://openbao-0.openbao-internal:8200     https://openbao-0.openbao-internal:8201
#   1      openbao-1          https://openbao-1.openbao-internal:8200     https://openbao-1.openbao-internal:8201
#   2      openbao-2          https://openbao-2.openbao-internal:8200     https://openbao-2.openbao-internal:8201
#
# Host names are those of a Kubernetes StatefulSet "openbao" with a headless Service
# "openbao-internal"; use your own, and put all three (and the client-facing name) in the
# certificate's subjectAltName.
#
# Files every node needs:
#   /openbao/tls/tls.crt, tls.key   the node's certificate (chain) and key
#   /openbao/tls/ca.crt             the CA that signed every node's certificate
#   /openbao/data                   raft storage (a persistent volume per node)
#   /openbao/audit                  the file audit device (a persistent volume per node)
#
# Bring-up: start all three; `bao operator init` on one (e.g. 5 key shares, threshold 3, or
# an auto-unseal seal below); unseal it; unseal the other two with the same keys - their
# retry_join below makes them join by themselves. Then `broker bootstrap` against the cluster.
#
# tests/ha/test_deploy_files.py starts three nodes from this very file (paths, ports and names
# mapped to a temporary directory and 127.0.0.1) and checks they form one TLS cluster.

ui = false

# Standbys serve reads from their own copy by default since OpenBao 2.5, which can lag the
# active node: a client reading right after its write may get the old value. The broker sends
# everything to the active node anyway; this keeps every other client consistent too.
disable_standby_reads = true

storage "raft" {
  path    = "/openbao/data"
  node_id = "openbao-0" # PER NODE (BAO_RAFT_NODE_ID)

  # Raft timing multiplier: 1 is the production value (the default, 5, is for small dev
  # machines): the cluster notices a dead leader and elects a new one in seconds, not ~15 s.
  performance_multiplier = 1

  # Every node lists every node (itself included: a node never joins itself). An
  # uninitialised node keeps trying these until one of them is the active node, then joins
  # it once it is given the unseal keys (or at once, with an auto-unseal seal).
  retry_join {
    leader_api_addr       = "https://openbao-0.openbao-internal:8200"
    leader_ca_cert_file   = "/openbao/tls/ca.crt"
    leader_tls_servername = "openbao-0.openbao-internal"
  }
  retry_join {
    leader_api_addr       = "https://openbao-1.openbao-internal:8200"
    leader_ca_cert_file   = "/openbao/tls/ca.crt"
    leader_tls_servername = "openbao-1.openbao-internal"
  }
  retry_join {
    leader_api_addr       = "https://openbao-2.openbao-internal:8200"
    leader_ca_cert_file   = "/openbao/tls/ca.crt"
    leader_tls_servername = "openbao-2.openbao-internal"
  }
}

# TLS on the API (8200). The cluster port (8201) always speaks mutual TLS with certificates
# the cluster issues itself.
listener "tcp" {
  address         = "0.0.0.0:8200"
  cluster_address = "0.0.0.0:8201"
  tls_disable     = false
  tls_cert_file   = "/openbao/tls/tls.crt"
  tls_key_file    = "/openbao/tls/tls.key"
  tls_min_version = "tls12"
}

api_addr     = "https://openbao-0.openbao-internal:8200" # PER NODE (BAO_API_ADDR)
cluster_addr = "https://openbao-0.openbao-internal:8201" # PER NODE (BAO_CLUSTER_ADDR)

# Auto-unseal (recommended in production: a restarted node unseals itself). For example:
# seal "awskms" {
#   region     = "eu-west-1"
#   kms_key_id = "alias/openbao-unseal"
# }

# Two audit devices, declared here: OpenBao refuses to enable them through the API. Two,
# because OpenBao refuses any request it cannot audit: with one device, a full disk would
# stop every request. The declarations must be identical on every node (a standby whose
# devices differ cannot take over), hence the same paths everywhere.
audit "file" "broker" {
  options {
    file_path = "/openbao/audit/audit.log"
  }
}

# The same entries on stdout, for the log collector.
audit "file" "stdout" {
  options {
    file_path = "stdout"
  }
}

telemetry {
  prometheus_retention_time = "30s"
  disable_hostname          = true
}
