#!/usr/bin/env bash
# Serve the tcpcopy 1.3 instances that still run on online hosts, in place of intercept 1.0.
# Run it on the assistant host, as root; stop it with Ctrl-C.
#
#   classic-for-tcpcopy.sh IFACE PORT TCPCOPY_HOSTS
#
# IFACE: where the target's replies arrive; PORT: the target's service port;
# TCPCOPY_HOSTS: the online hosts' addresses or networks (CIDR,...): a classic tcpcopy
# cannot authenticate, so tc-feedback accepts classic connections from these only.
# The tcpcopy command lines stay as they are (-s ASSISTANT, port 36524).
# NATIVE=tcp::36525 also serves tc-session --feedback tcp:ASSISTANT:36525 from the same
# capture (--allow too; a key from $TC_FEEDBACK_KEY_FILE), so hosts move one at a time.
set -euo pipefail
usage="usage: classic-for-tcpcopy.sh IFACE PORT TCPCOPY_HOSTS"
iface=${1:?$usage}
port=${2:?$usage}
allow=${3:?$usage}
here=$(cd "$(dirname "$0")" && pwd)
PATH=$here/../bin:$PATH     # the checkout's tools, when not installed

echo "+ sysctl -w net.ipv4.ip_forward=0"   # the replies end here
sysctl -qw net.ipv4.ip_forward=0
tc-intercept "$iface" -F "tcp and src port $port" \
  | tc-feedback --classic tcp::36524 --allow "$allow" ${NATIVE:+--listen "$NATIVE"} --stats
