#!/usr/bin/env bash
# Tee the streams of a replay to files, then look at them: text, and pcap for Wireshark.
#
#   tee-and-inspect.sh PCAP TARGET_IP:PORT OUTDIR [FEEDBACK_ADDR]
#
# OUTDIR gets cap.cbor (what was read), out.cbor (what tc-session sent), their text
# views cap.txt / out.txt, out.pcap (tc-dump --pcap) and out.jsonl (tc-dump --json).
# Live instead of a pcap: replace `tc-readpcap "$pcap"` with `tc-capture -c 10000 IFACE`.
# The feedback side runs as in offline-replay.sh; SPEED as there.
set -euo pipefail
usage="usage: tee-and-inspect.sh PCAP TARGET_IP:PORT OUTDIR [FEEDBACK_ADDR]"
pcap=${1:?$usage} target=${2:?$usage} out=${3:?$usage}
feedback=${4:-${TC_FEEDBACK:-tcp:127.0.0.1:36524}}
here=$(cd "$(dirname "$0")" && pwd)
PATH=$here/../bin:$PATH     # the checkout's tools, when not installed
mkdir -p "$out"

tc-readpcap "$pcap" | tc-pace --speed "${SPEED:-1}" | tee "$out/cap.cbor" \
  | tc-session --target "$target" --feedback "$feedback" | tee "$out/out.cbor" \
  | tc-pace | tc-emit

tc-dump "$out/cap.cbor" > "$out/cap.txt"            # tcpdump-like, one line per record
tc-dump "$out/out.cbor" > "$out/out.txt"
tc-dump --json "$out/out.cbor" > "$out/out.jsonl"   # every field; jq-friendly
tc-dump --pcap "$out/out.cbor" > "$out/out.pcap"    # open in Wireshark, or:
echo "first packets sent to the target:"
tcpdump -nn -r "$out/out.pcap" -c 5 2>/dev/null
echo "$(wc -l < "$out/cap.txt") records read, $(grep -c . "$out/out.txt") written; files in $out"
