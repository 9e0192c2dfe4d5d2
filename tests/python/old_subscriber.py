#!/usr/bin/env python3
"""Plays a fail2ban-zmq-tools subscriber (pyzmq) for tests/tests/legacy_interop.rs.

    old_subscriber.py ENDPOINT [--lifetime SECONDS]

As the old subscriber did: a SUB socket subscribes to "" (everything) and connects
to ENDPOINT. Prints, flushed at once:

    subscribed <ENDPOINT>
    got <string>              a one-frame message (what the old subscriber read)
    multipart <n> <frame>...  a message of n > 1 frames, which the old subscriber
                              could not have read (it took the first frame only)
    undecodable <hex>         a one-frame message that is not UTF-8

Exits 0 after --lifetime seconds (a bound in case the test that started it dies
without killing it). Backslashes, CR and LF in printed strings are escaped.
"""

import argparse
import sys
import time

import zmq


def show(text):
    return text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")


def say(line):
    print(line, flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("endpoint")
    ap.add_argument("--lifetime", type=float, default=300.0)
    args = ap.parse_args()

    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt_string(zmq.SUBSCRIBE, "")
    sock.connect(args.endpoint)
    say("subscribed " + args.endpoint)
    end = time.monotonic() + args.lifetime
    while True:
        left = end - time.monotonic()
        if left <= 0:
            return 0
        if not sock.poll(int(min(left, 1.0) * 1000)):
            continue
        frames = sock.recv_multipart()
        if len(frames) > 1:
            shown = " ".join(show(f.decode("utf-8", "replace")) for f in frames)
            say("multipart %d %s" % (len(frames), shown))
            continue
        try:
            say("got " + show(frames[0].decode("utf-8")))
        except UnicodeDecodeError:
            say("undecodable " + frames[0].hex())


if __name__ == "__main__":
    sys.exit(main())
