#!/usr/bin/env bash
# Replay a pcap into a target server. Run it on the "online" host, as root.
#
#   offline-replay.sh PCAP TARGET_IP:PORT [FEEDBACK_ADDR]
#
# PORT is the server port in the capture (sessions to other ports are ignored); use
# tc-session -x to map other ports. FEEDBACK_ADDR is where tc-feedback listens on the
# assistant host (default: $TC_FEEDBACK, else tcp:127.0.0.1:36524). Start it first:
#   tc-intercept IFACE -F 'tcp and src port PORT' | tc-feedback --listen tcp::36524
# and make the target route the capture's client addresses to the assistant
# (live-mirror.sh target). SPEED=2 replays twice as fast as recorded (default 1).
# The --stats summary of tc-session says how every session ended (see tc-session(1)).
#
# Try it: sudo python3 -m tcpcopylib.demo --pcap examples/http-lab.pcap  (does all of this)
set -euo pipefail
usage="usage: offline-replay.sh PCAP TARGET_IP:PORT [FEEDBACK_ADDR]"
pcap=${1:?$usage}
target=${2:?$usage}
feedback=${3:-${TC_FEEDBACK:-tcp:127.0.0.1:36524}}
here=$(cd "$(dirname "$0")" && pwd)
PATH=$here/../bin:$PATH     # the checkout's tools, when not installed

tc-readpcap "$pcap" \
  | tc-pace --speed "${SPEED:-1}" \
  | tc-session --target "$target" --feedback "$feedback" --stats \
  | tc-pace \
  | tc-emit --stats
