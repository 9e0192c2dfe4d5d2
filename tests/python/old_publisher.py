#!/usr/bin/env python3
"""Plays a fail2ban-zmq-tools publisher (pyzmq) for tests/tests/legacy_interop.rs.

    old_publisher.py [--token TOKEN] [--broadcast-refused] [--lifetime SECONDS]

Binds a REP socket (monitors report there) and a PUB socket (subscribers read
there) on ephemeral loopback ports. Each request is one string frame, validated by
the old publisher's rules:

- 4 or 5 `|`-separated fields; with a token, 5 fields, the first being the token,
  which is removed;
- host name per RFC 1123; action `ban` or `unban`, any case; address accepted by
  the C library's inet_aton (IPv4 only); jail matching ^[a-zA-Z0-9_-]*$.

A valid request is answered with itself minus the token, and that string is
published on PUB, one frame, no topic; an invalid one is answered `NAK` (and, with
--broadcast-refused, published verbatim anyway, as a faulty peer might, so that a
test can check what a subscriber does with garbage).

Prints, flushed at once:

    bound rep tcp://127.0.0.1:PORT
    bound pub tcp://127.0.0.1:PORT
    got <request>
    sent <reply>
    published <string>

Exits 0 after --lifetime seconds (a bound in case the test that started it dies
without killing it). Backslashes, CR and LF in printed strings are escaped.
"""

import argparse
import re
import socket
import sys
import time

import zmq

JAIL = re.compile(r"^[a-zA-Z0-9_-]*$")
LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def show(text):
    return text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")


def say(line):
    print(line, flush=True)


def valid_hostname(host):
    if host.endswith("."):
        host = host[:-1]
    if not host or len(host) > 255:
        return False
    return all(LABEL.match(label) for label in host.split("."))


def valid_ipv4(text):
    try:
        socket.inet_aton(text)
    except (OSError, ValueError):
        return False
    return True


def check(message, token):
    """The message to echo and publish, or None for NAK."""
    fields = message.split("|")
    if token is not None:
        if len(fields) != 5 or fields[0] != token:
            return None
        fields = fields[1:]
        message = "|".join(fields)
    elif len(fields) not in (4, 5):
        return None
    host, jail, action, ip = fields[:4]
    if not valid_hostname(host):
        return None
    if action.lower() not in ("ban", "unban"):
        return None
    if not valid_ipv4(ip):
        return None
    if not JAIL.match(jail):
        return None
    return message


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--token")
    ap.add_argument("--broadcast-refused", action="store_true")
    ap.add_argument("--lifetime", type=float, default=300.0)
    args = ap.parse_args()

    ctx = zmq.Context()
    rep = ctx.socket(zmq.REP)
    rep.setsockopt(zmq.LINGER, 0)
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    rep_port = rep.bind_to_random_port("tcp://127.0.0.1")
    pub_port = pub.bind_to_random_port("tcp://127.0.0.1")
    say("bound rep tcp://127.0.0.1:%d" % rep_port)
    say("bound pub tcp://127.0.0.1:%d" % pub_port)

    end = time.monotonic() + args.lifetime
    while True:
        left = end - time.monotonic()
        if left <= 0:
            return 0
        if not rep.poll(int(min(left, 1.0) * 1000)):
            continue
        frames = rep.recv_multipart()
        try:
            message = frames[0].decode("utf-8")
        except UnicodeDecodeError:
            message = None
        say("got " + show(message if message is not None else repr(frames[0])))
        echo = None if message is None else check(message, args.token)
        reply = "NAK" if echo is None else echo
        rep.send_string(reply)
        say("sent " + show(reply))
        if echo is not None:
            pub.send_string(echo)
            say("published " + show(echo))
        elif args.broadcast_refused and len(frames) == 1:
            pub.send(frames[0])
            say("published " + show(frames[0].decode("utf-8", "replace")))


if __name__ == "__main__":
    sys.exit(main())
