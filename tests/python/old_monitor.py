#!/usr/bin/env python3
"""Plays a fail2ban-zmq-tools monitor (pyzmq) for tests/tests/legacy_interop.rs.

    old_monitor.py ENDPOINT [--token TOKEN] MESSAGE...

For each MESSAGE (`host|jail|action|ip`, sent as given even when invalid), as the
old monitor did: a REQ socket connects to ENDPOINT, sends one string frame,
`TOKEN|MESSAGE` when a token is given, and reads one string back, which the old
monitor compared with MESSAGE. Prints, flushed at once, one line each:

    sent <what was sent>
    got <the reply>
    verdict accepted|rejected      (accepted: the reply equals MESSAGE)

then `done`. With no reply within --timeout seconds: `timeout <MESSAGE>`, exit 3.
Backslashes, CR and LF in printed strings are escaped (\\\\, \\r, \\n) to keep one
line per item.
"""

import argparse
import sys

import zmq


def show(text):
    return text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")


def say(line):
    print(line, flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("endpoint")
    ap.add_argument("messages", nargs="+")
    ap.add_argument("--token")
    ap.add_argument("--timeout", type=float, default=20.0)
    args = ap.parse_args()

    ctx = zmq.Context()
    for message in args.messages:
        # The old monitor made a new context and socket per event.
        sock = ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, int(args.timeout * 1000))
        sock.connect(args.endpoint)
        out = message if args.token is None else "%s|%s" % (args.token, message)
        sock.send_string(out)
        say("sent " + show(out))
        try:
            reply = sock.recv_string()
        except zmq.Again:
            say("timeout " + show(message))
            return 3
        say("got " + show(reply))
        say("verdict " + ("accepted" if reply == message else "rejected"))
        sock.close()
    ctx.term()
    say("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
