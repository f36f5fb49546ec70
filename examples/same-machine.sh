#!/usr/bin/env bash
# Replay a pcap into a server on THIS machine (target and assistant on one host, as root).
#
#   same-machine.sh PCAP TARGET_IP:PORT CLIENT_NET
#
# The server's replies to the copied clients (CLIENT_NET, e.g. 10.200.9.0/24: the pcap's
# client addresses) are routed into a black-hole interface where tc-intercept
# picks them up; feedback goes over a Unix socket. TARGET_IP must be a local address that
# is not 127.x (replies from 127.x may not leave lo). Everything is removed at exit.
# SPEED=2 replays twice as fast as recorded (default 1).
set -euo pipefail
usage="usage: same-machine.sh PCAP TARGET_IP:PORT CLIENT_NET"
pcap=${1:?$usage} target=${2:?$usage} net=${3:?$usage}
here=$(cd "$(dirname "$0")" && pwd)
PATH=$here/../bin:$PATH     # the checkout's tools, when not installed
bh=${BLACKHOLE:-tcbh0} dir=$(mktemp -d)

cleanup() {
  kill "${ic:-}" 2>/dev/null || true; wait || true   # tc-feedback ends at its EOF
  ip link del "$bh" 2>/dev/null || true; rm -rf "$dir"
}
trap cleanup EXIT
# a black hole that tc-intercept can watch: a veth pair without ARP (frames to our own MAC,
# dropped by the far end); `ip link add $bh type dummy` works too where that module exists
ip link add "$bh" type veth peer name "$bh-end"
ip link set "$bh" arp off up && ip link set "$bh-end" up
ip route add "$net" dev "$bh"                      # fails if a route exists: check first

mkfifo "$dir/fb"
tc-intercept "$bh" -F "tcp and src port ${target##*:}" > "$dir/fb" & ic=$!
tc-feedback --listen "unix:$dir/sock" < "$dir/fb" &
for _ in $(seq 50); do [ -S "$dir/sock" ] && break; sleep 0.1; done
sleep 0.5                                          # let tc-intercept's capture start

tc-readpcap "$pcap" | tc-pace --speed "${SPEED:-1}" \
  | tc-session --target "$target" --feedback "unix:$dir/sock" --stats \
  | tc-pace | tc-emit --stats
