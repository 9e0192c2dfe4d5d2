#!/bin/sh
# The demo's attacker: appends ATTEMPTS sshd "Failed password" lines for ATTACKER_IP
# to AUTH_LOG (node1's /var/log/sshd/auth.log, shared through a volume), one per
# INTERVAL seconds, in the syslog format sshd's lines have in /var/log/auth.log.
# node1's sshd jail (maxretry = 3) bans the address after the third line.
set -eu
ip=${ATTACKER_IP:-203.0.113.66}
log=${AUTH_LOG:-/attack/auth.log}
attempts=${ATTEMPTS:-5}
interval=${INTERVAL:-1}

i=1
while [ "$i" -le "$attempts" ]; do
    printf '%s node1 sshd[%d]: Failed password for invalid user admin from %s port %d ssh2\n' \
        "$(date '+%b %e %H:%M:%S')" "$((4000 + i))" "$ip" "$((40000 + i))" >>"$log"
    echo "attacker: failed ssh login $i/$attempts from $ip written to node1's auth.log"
    i=$((i + 1))
    sleep "$interval"
done
echo "attacker: done; node1 should ban $ip, and the cluster every other node"
