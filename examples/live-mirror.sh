#!/usr/bin/env bash
# Live mirroring across three hosts. Run it as root on each host, with that host's role:
#
#   live-mirror.sh target      # 1. route the replies for the clients to the assistant
#   live-mirror.sh assistant   # 2. capture those replies, serve them as feedback
#   live-mirror.sh online      # 3. copy live client traffic to the target
#
# Settings (environment): IFACE = this host's interface (online: where the clients'
# packets arrive; assistant: where the target's replies arrive), PORT (8080) = service
# port on online and target, TARGET / ASSISTANT = their IP addresses, CLIENT_NET = the
# clients' network (target role), FB_PORT (36524) = tc-feedback's port.
# Stop the online and assistant roles with Ctrl-C.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
PATH=$here/../bin:$PATH     # the checkout's tools, when not installed
PORT=${PORT:-8080} FB_PORT=${FB_PORT:-36524}

case "${1:-}" in
target)  # nothing runs here; with rp_filter=1 this must be the interface copies arrive on
  echo "+ ip route replace ${CLIENT_NET:?} via ${ASSISTANT:?}"
  ip route replace "$CLIENT_NET" via "$ASSISTANT" ;;
assistant)  # forwarding off: the replies end here, the real clients never see them
  echo "+ sysctl -w net.ipv4.ip_forward=0 net.ipv6.conf.all.forwarding=0"
  sysctl -qw net.ipv4.ip_forward=0 net.ipv6.conf.all.forwarding=0
  tc-intercept "${IFACE:?}" -F "tcp and src port $PORT" \
    | tc-feedback --listen "tcp::$FB_PORT" --stats ;;
online)
  tc-capture "${IFACE:?}" \
    | tc-session --target "${TARGET:?}:$PORT" --feedback "tcp:${ASSISTANT:?}:$FB_PORT" --stats \
    | tc-pace \
    | tc-emit --stats ;;
*) echo "usage: live-mirror.sh target|assistant|online (settings in the environment)" >&2
   exit 2 ;;
esac
