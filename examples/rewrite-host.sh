#!/usr/bin/env bash
# Replay a pcap into a test server with production values replaced on the way. Run it on
# the "online" host, as root, with the assistant side running (see offline-replay.sh).
#
#   rewrite-host.sh PCAP TARGET_IP:PORT NEW_HOST [FEEDBACK_ADDR]
#
# Every HTTP request reaches the target with "Host: NEW_HOST". RULES=FILE adds the rules
# of a tc-rewrite rule file, one a line (see tc-rewrite(1)), for example:
#   replace token=PRODSECRET token=TEST      (in heads and bodies: Content-Length follows)
#   url '^/api/v1/' '/api/v2/'
# Lengths may change: tc-rewrite renumbers each connection's bytes, tc-session replays
# them as a well-formed stream. The --stats lines count each rule's rewrites and how
# every session ended.
set -euo pipefail
usage="usage: rewrite-host.sh PCAP TARGET_IP:PORT NEW_HOST [FEEDBACK_ADDR]"
pcap=${1:?$usage}
target=${2:?$usage}
host=${3:?$usage}
feedback=${4:-${TC_FEEDBACK:-tcp:127.0.0.1:36524}}
here=$(cd "$(dirname "$0")" && pwd)
PATH=$here/../bin:$PATH     # the checkout's tools, when not installed

tc-readpcap "$pcap" \
  | tc-rewrite --host "$host" ${RULES:+--rules "$RULES"} --stats \
  | tc-session --target "$target" --feedback "$feedback" --stats \
  | tc-pace \
  | tc-emit --stats
