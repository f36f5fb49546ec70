#!/usr/bin/env bash
# Replay a capture into a target twice and compare the target's answers and latency with
# the original ones (tc-diff). PCAP must hold both directions (as tcpdump -w writes
# it). Three steps, as root where they capture or send:
#
#   compare-responses.sh assistant IFACE PORT REPLIES      # first, on the assistant: keeps
#                                                          # the target's replies with payload
#   compare-responses.sh replay PCAP TARGET_IP:PORT MAP [FEEDBACK_ADDR]   # on the online host
#   compare-responses.sh diff PCAP MAP REPLIES [REPORT.html]              # then, anywhere
#
# The replay sends two copies of each session (-n 2): tc-diff compares copy 0 with the
# original and learns noise (Date, ids...) from what differs between the two copies.
# Exit status of the diff step: 0 same answers, 1 differences (see tc-diff(1)).
set -euo pipefail
usage="usage: compare-responses.sh assistant|replay|diff ARGS... (see the comments)"
role=${1:?$usage}
here=$(cd "$(dirname "$0")" && pwd)
PATH=$here/../bin:$PATH     # the checkout's tools, when not installed

case $role in
  assistant)
    tc-intercept "${2:?$usage}" -F "tcp and src port ${3:?$usage}" --payload all \
      | tee "${4:?$usage}" | tc-feedback --listen tcp::36524 ;;
  replay)
    tc-readpcap "${2:?$usage}" \
      | tc-session --target "${3:?$usage}" --sessions "${4:?$usage}" -n 2 --stats \
          --feedback "${5:-${TC_FEEDBACK:-tcp:127.0.0.1:36524}}" \
      | tc-pace | tc-emit ;;
  diff)
    tc-diff "${2:?$usage}" --sessions "${3:?$usage}" --target "${4:?$usage}" \
      ${5:+--html "$5"} ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
