#!/usr/bin/env bash
# Replay a pcap through an assistant that still runs intercept 1.0 (TCPCopy's), as tcpcopy
# would. Run it on the "online" host, as root.
#
#   classic-to-intercept.sh PCAP TARGET_IP:PORT INTERCEPT_IP[:36524]
#
# On the assistant, intercept as it runs today, e.g.
#   intercept -i eth1 -F 'tcp and src port PORT' -p 36524
# (or, when the assistant moves to tcpcopylib: classic-for-tcpcopy.sh). tc-session sends
# intercept a version message, then one CLIENT_ADD per replayed connection before its SYN,
# and reads intercept's 64-byte records: see tcpcopy(7), CLASSIC PROTOCOL. IPv4 only.
# SPEED=2 replays twice as fast as recorded (default 1).
set -euo pipefail
usage="usage: classic-to-intercept.sh PCAP TARGET_IP:PORT INTERCEPT_IP[:PORT]"
pcap=${1:?$usage}
target=${2:?$usage}
intercept=${3:?$usage}
here=$(cd "$(dirname "$0")" && pwd)
PATH=$here/../bin:$PATH     # the checkout's tools, when not installed

tc-readpcap "$pcap" \
  | tc-pace --speed "${SPEED:-1}" \
  | tc-session --target "$target" --feedback "classic:$intercept" --stats \
  | tc-pace \
  | tc-emit --stats
