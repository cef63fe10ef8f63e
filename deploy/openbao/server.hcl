# OpenBao server for docker-compose.yml: one node, raft storage, two audit devices.
#
# This compose stack is for LOCAL, production-like runs only. It is not a production
# configuration:
#   - the listener below speaks plain HTTP. Production runs every listener with TLS
#     (tls_cert_file / tls_key_file) and several raft nodes;
#   - the stack's broker therefore runs with BROKER_ENV=dev, because the broker's
#     production mode refuses plain-http Vault addresses;
#   - deploy/openbao/bootstrap.sh initialises with a single unseal key and keeps it in a
#     Docker volume next to the root token.
#
# The openbao/openbao image starts `bao server -config=/openbao/config` as the unprivileged
# "openbao" user. /openbao/file and /openbao/logs exist in the image and belong to that user,
# so the compose volumes are mounted there (a fresh named volume inherits that ownership).

# Raft, not "file": OpenBao 2.7 answers "unknown storage type file". Raft creates the path.
storage "raft" {
  path    = "/openbao/file"
  node_id = "openbao-compose"
  # Default 5 scales raft timeouts (first leader election ~7 s); 1 brings it to ~2 s.
  performance_multiplier = 1
}

# Plain HTTP, local runs only (see above). Published on 127.0.0.1 by docker-compose.yml.
listener "tcp" {
  address         = "0.0.0.0:8200"
  cluster_address = "0.0.0.0:8201"
  tls_disable     = true
}

# How other containers reach this node: the compose service name.
api_addr     = "http://openbao:8200"
cluster_addr = "https://openbao:8201"

ui = false

# OpenBao only accepts audit devices declared here: enabling one through sys/audit answers 400.
# Two devices, because OpenBao refuses a request it cannot audit: with one device, a full disk
# would block every request. Entries are JSON lines with secrets and tokens HMAC'd.
audit "file" "broker" {
  options {
    file_path = "/openbao/logs/audit.log"
  }
}

# The same entries on the container's stdout (`docker compose logs openbao`).
audit "file" "stdout" {
  options {
    file_path = "stdout"
  }
}
