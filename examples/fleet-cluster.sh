#!/usr/bin/env bash
# A three-node NATS JetStream cluster for tc-publish and tc-subscribe (tcpcopy(7), FLEET).
# Run "fleet-cluster.sh node N" once per node (N = 0, 1, 2): nats-server, until Ctrl-C.
# Settings (environment): NODES = the nodes' addresses, comma-separated (default three times
# 127.0.0.1: all on this host, client ports 4222-4224, route ports 6222-6224), DIR
# (/var/lib/tcpcopy-nats) = the streams and secrets, TOKEN_FILE = the clients' token and
# ROUTE_PASSWORD_FILE = the nodes' password (made if missing), NATS_SERVER = its path.
# Then, on the online hosts and the replay hosts (K = 0, 1, 2):
#   tc-capture eth0 | tc-publish -s nats://NODE0:4222,... --token-file TOKEN --stream web -P 6 --replicas 3
#   tc-subscribe -s nats://NODE0:4222,... --token-file TOKEN --stream web -p K/3 | tc-session -f K/6 ...
set -euo pipefail
[ "${1:-}" = node ] && [[ "${2:-}" =~ ^[012]$ ]] && n=$2 ||
  { echo "usage: fleet-cluster.sh node 0|1|2 (settings in the environment)" >&2; exit 2; }
IFS=, read -r -a nodes <<< "${NODES:-127.0.0.1,127.0.0.1,127.0.0.1}"
DIR=${DIR:-/var/lib/tcpcopy-nats}
mkdir -p "$DIR/n$n" && chmod 700 "$DIR"
TOKEN_FILE=${TOKEN_FILE:-$DIR/token} ROUTE_PASSWORD_FILE=${ROUTE_PASSWORD_FILE:-$DIR/route.password}
for f in "$TOKEN_FILE" "$ROUTE_PASSWORD_FILE"; do  # random secrets, readable by root only
  [ -s "$f" ] || (umask 077; head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$f")
done
one_host=$([ "${nodes[0]}" = "${nodes[1]}" ] && echo 1 || echo 0)  # then the ports differ
port() { echo $(($1 + one_host * $2)); }
pw=$(cat "$ROUTE_PASSWORD_FILE") routes=""
for i in 0 1 2; do
  [ "$i" = "$n" ] || routes+="\"nats-route://route:$pw@${nodes[$i]}:$(port 6222 "$i")\", "
done
conf=$DIR/n$n/nats.conf
(umask 077; cat > "$conf" <<CONF
server_name: n$n
listen: "${nodes[$n]}:$(port 4222 "$n")"
jetstream { store_dir: "$DIR/n$n" }
authorization { token: "$(cat "$TOKEN_FILE")" }
cluster { name: tcpcopy, listen: "${nodes[$n]}:$(port 6222 "$n")",
  authorization { user: route, password: "$pw" }, routes: [ ${routes%, } ] }
CONF
)
echo "node n$n: nats://${nodes[$n]}:$(port 4222 "$n") (clients' token in $TOKEN_FILE)" >&2
exec "${NATS_SERVER:-nats-server}" -c "$conf"
