#!/bin/sh
# Initialise and unseal the compose stack's OpenBao (the `openbao-init` one-shot service).
#
# LOCAL USE ONLY. This keeps the unseal key and the root token in a Docker volume, in plain
# files, next to each other. That is acceptable for a throwaway local stack and never for a
# real deployment, which uses an auto-unseal mechanism (KMS/HSM/transit) or key shares held
# by different people, and revokes the root token after bootstrap.
#
# Idempotent: the first run initialises (one key share) and saves the result; every run
# unseals if needed and waits until the node is active, so `docker compose up` after a
# restart brings a sealed OpenBao back.
#
# Files written to $KEYS_DIR (the `openbao-keys` volume):
#   init.json    the full `bao operator init` output      (root only, 0600)
#   unseal-key   the single unseal key                      (root only, 0600)
#   root-token   the root token, for `broker bootstrap`     (owned by the broker image's user, 0400)
set -eu

BAO_ADDR="${BAO_ADDR:-http://openbao:8200}"
KEYS_DIR="${KEYS_DIR:-/keys}"
# The uid of the non-root user in deploy/Dockerfile; the broker-bootstrap service reads the
# root token as that user.
BROKER_UID="${BROKER_UID:-10001}"
export BAO_ADDR
umask 077

# 1. Wait for the server. `bao status` exits 0 (unsealed), 2 (sealed) or 1 (error, e.g. not
#    listening yet). Not `bao operator init -status`: it exits 2 on connection errors too.
tries=0
while :; do
    rc=0
    status="$(bao status -format=json 2>/dev/null)" || rc=$?
    [ "$rc" -ne 1 ] && break
    tries=$((tries + 1))
    if [ "$tries" -ge 60 ]; then
        echo "openbao-init: no answer from $BAO_ADDR after 60 s" >&2
        exit 1
    fi
    sleep 1
done

# 2. Initialise once. Never overwrite saved keys: an uninitialised server next to existing
#    keys means the data volume was deleted without the keys volume.
if printf '%s\n' "$status" | grep -q '"initialized": *false'; then
    if [ -e "$KEYS_DIR/init.json" ]; then
        echo "openbao-init: OpenBao has no data but $KEYS_DIR/init.json exists;" \
            "remove both volumes (docker compose down -v) to start over" >&2
        exit 1
    fi
    echo "openbao-init: initialising $BAO_ADDR (1 key share, local use only)"
    bao operator init -key-shares=1 -key-threshold=1 -format=json >"$KEYS_DIR/init.json.tmp"
    mv "$KEYS_DIR/init.json.tmp" "$KEYS_DIR/init.json"
    # The JSON is pretty-printed: the key is on the line after "unseal_keys_b64": [
    awk '/"unseal_keys_b64"/ { getline; gsub(/[ \t",]/, ""); print; exit }' \
        "$KEYS_DIR/init.json" >"$KEYS_DIR/unseal-key"
    sed -n 's/.*"root_token": *"\([^"]*\)".*/\1/p' "$KEYS_DIR/init.json" >"$KEYS_DIR/root-token"
fi
if [ ! -s "$KEYS_DIR/unseal-key" ] || [ ! -s "$KEYS_DIR/root-token" ]; then
    echo "openbao-init: OpenBao is initialised but $KEYS_DIR has no unseal key or root token" >&2
    exit 1
fi
chown "$BROKER_UID" "$KEYS_DIR/root-token"
chmod 0400 "$KEYS_DIR/root-token"

# 3. Unseal if sealed.
if printf '%s\n' "$status" | grep -q '"sealed": *true'; then
    echo "openbao-init: unsealing"
    bao operator unseal "$(cat "$KEYS_DIR/unseal-key")" >/dev/null
fi

# 4. Wait until this node is the active raft leader: sys/health answers 200 only then
#    (429 standby, 501 not initialised, 503 sealed), and the broker's bootstrap needs it.
tries=0
until wget -q -O /dev/null "$BAO_ADDR/v1/sys/health"; do
    tries=$((tries + 1))
    if [ "$tries" -ge 60 ]; then
        echo "openbao-init: $BAO_ADDR did not become active after 60 s" >&2
        exit 1
    fi
    sleep 1
done
echo "openbao-init: OpenBao is initialised, unsealed and active"
