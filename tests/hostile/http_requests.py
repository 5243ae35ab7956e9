#!/usr/bin/env python3
"""Hostile HTTP requests against a bts-guru binary: how each request smuggling shape is
answered, and how long a trickled request body holds a connection. Standard library only.

Usage: python3 tests/hostile/http_requests.py BINARY [--trickle-s N] [--hold-cap-s N]

Starts BINARY on a free loopback port (1 shard, a test app, default settings otherwise),
subscribes a raw WebSocket client to `sports.football`, then for each shape sends a validly
signed publish framed that way and prints: the status line answered, whether the server closed
the connection, and whether the event reached the subscriber. Then sends a publish whose body
trickles one byte every --trickle-s seconds (default 2: each read is well within the 10 s read
timeout) and prints how long the server kept the connection (given up at --hold-cap-s, default
60). Written for RELIABILITY.md's "Hostile client" figures; not part of `cargo test` (the same
cases, with assertions, are in tests/http_bodies.rs).
"""

import argparse
import hashlib
import hmac
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

APP_ID, KEY, SECRET = "hostile", "hostile-key", "hostile-secret"


def signed(body: bytes) -> str:
    path = f"/apps/{APP_ID}/events"
    query = (f"auth_key={KEY}&auth_timestamp={int(time.time())}&auth_version=1.0"
             f"&body_md5={hashlib.md5(body).hexdigest()}")
    sig = hmac.new(SECRET.encode(), f"POST\n{path}\n{query}".encode(), hashlib.sha256).hexdigest()
    return f"{path}?{query}&auth_signature={sig}"


def chunked(body: bytes) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


class Subscriber:
    """A raw WebSocket client (RFC 6455 by hand) subscribed to one channel."""

    def __init__(self, addr, channel):
        self.s = socket.create_connection(addr)
        self.s.sendall((f"GET /app/{KEY}?protocol=7 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                        "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.s.recv(4096)
        self.buf = self.buf.split(b"\r\n\r\n", 1)[1]
        self.next(5)  # connection_established
        msg = json.dumps({"event": "pusher:subscribe", "data": {"channel": channel}}).encode()
        mask = b"\x01\x02\x03\x04"
        self.s.sendall(bytes([0x81, 0x80 | len(msg)]) + mask
                       + bytes(b ^ mask[i % 4] for i, b in enumerate(msg)))
        self.next(5)  # subscription_succeeded

    def next(self, timeout):
        """The next text message, or None within `timeout`."""
        self.s.settimeout(timeout)
        try:
            while True:
                if len(self.buf) >= 2:
                    n, off = self.buf[1] & 0x7F, 2
                    if n == 126:
                        n, off = int.from_bytes(self.buf[2:4], "big"), 4
                    elif n == 127:
                        n, off = int.from_bytes(self.buf[2:10], "big"), 10
                    if len(self.buf) >= off + n:
                        payload, self.buf = self.buf[off:off + n], self.buf[off + n:]
                        return json.loads(payload)
                chunk = self.s.recv(65536)
                if not chunk:
                    return None
                self.buf += chunk
        except socket.timeout:
            return None


def answer(addr, raw: bytes):
    """Sends `raw`; the first line answered and whether the server then closed."""
    s = socket.create_connection(addr)
    s.settimeout(3)
    s.sendall(raw)
    got = b""
    closed = False
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                closed = True
                break
            got += chunk
    except socket.timeout:
        pass
    except ConnectionResetError:
        closed = True
    s.close()
    first = got.split(b"\r\n", 1)[0].decode(errors="replace") or "(nothing)"
    return first, closed


def shapes(body: bytes):
    t, n, c = signed(body), len(body), chunked(body)
    post = lambda headers, rest: f"POST {t} HTTP/1.1\r\nHost: x\r\n{headers}\r\n\r\n".encode() + rest
    return [
        ("Content-Length + Transfer-Encoding: chunked",
         post(f"Content-Length: {len(c)}\r\nTransfer-Encoding: chunked", c)),
        ("Transfer-Encoding: gzip, chunked", post("Transfer-Encoding: gzip, chunked", c)),
        ("Transfer-Encoding: chunked, gzip", post("Transfer-Encoding: chunked, gzip", c)),
        ("Transfer-Encoding: identity (+ Content-Length)",
         post(f"Transfer-Encoding: identity\r\nContent-Length: {n}", body)),
        ("Transfer-Encoding: xchunked", post("Transfer-Encoding: xchunked", c)),
        ("two Transfer-Encoding: chunked",
         post("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked", c)),
        ("two equal Content-Length", post(f"Content-Length: {n}\r\nContent-Length: {n}", body)),
        ("Content-Length: n then 0", post(f"Content-Length: {n}\r\nContent-Length: 0", body)),
        ("Content-Length: +n", post(f"Content-Length: +{n}", body)),
        ("Content-Length: -1", post("Content-Length: -1", body)),
        ("Content-Length: n n", post(f"Content-Length: {n} {n}", body)),
        ("bare LF line endings",
         f"POST {t} HTTP/1.1\nHost: x\nContent-Length: {n}\n\n".encode() + body),
        ("obs-fold line", post(f"X-Folded: a\r\n b\r\nContent-Length: {n}", body)),
        ("HTTP/2.0 request line",
         f"POST {t} HTTP/2.0\r\nHost: x\r\nContent-Length: {n}\r\n\r\n".encode() + body),
        ("HTTP/1.0 + Transfer-Encoding: chunked",
         f"POST {t} HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + c),
        ("plain chunked (legitimate)", post("Transfer-Encoding: chunked", c)),
    ]


def trickle(addr, every, cap):
    """Seconds until the server answers or closes a body sent one byte every `every` s."""
    body = json.dumps({"name": "e", "channel": "sports.football", "data": "x" * 200}).encode()
    s = socket.create_connection(addr)
    s.sendall(f"POST {signed(body)} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
              .encode())
    started = time.monotonic()
    s.settimeout(every)
    i = 0
    while time.monotonic() - started < cap:
        try:
            if i < len(body):
                s.sendall(body[i:i + 1])
                i += 1
            got = s.recv(4096)
            return time.monotonic() - started, got.split(b"\r\n", 1)[0].decode() or "closed"
        except socket.timeout:
            continue
        except OSError as e:
            return time.monotonic() - started, f"closed ({e.strerror})"
    return time.monotonic() - started, f"still open after {cap} s ({i} bytes sent)"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--trickle-s", type=float, default=2.0)
    ap.add_argument("--hold-cap-s", type=float, default=60.0)
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REVERB_", "REDIS_", "BTS_"))}
    env.update(REVERB_APP_ID=APP_ID, REVERB_APP_KEY=KEY, REVERB_APP_SECRET=SECRET)
    with tempfile.TemporaryDirectory() as dir:
        proc = subprocess.Popen(
            [os.path.abspath(args.binary), "--env-file", "/dev/null", "--host", "127.0.0.1", "--port", "0",
             "--metrics-port", "0", "--shards", "1"],
            cwd=dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            line = proc.stdout.readline().strip()
            host, port = line.removeprefix("ready ").rsplit(":", 1)
            addr = (host, int(port))
            sub = Subscriber(addr, "sports.football")
            print("| shape | answer | connection | event delivered |")
            print("|---|---|---|---|")
            for i, (what, raw) in enumerate(shapes(b"")):
                body = json.dumps({"name": "e", "channel": "sports.football", "data": f"s{i}"})
                raw = dict(shapes(body.encode()))[what]
                first, closed = answer(addr, raw)
                delivered = []
                while (m := sub.next(0.3)) is not None:
                    delivered.append(m.get("data"))
                print(f"| {what} | {first} | {'closed' if closed else 'kept'} | "
                      f"{'yes' if delivered else 'no'} |")
            took, outcome = trickle(addr, args.trickle_s, args.hold_cap_s)
            print(f"\ntrickled body, one byte every {args.trickle_s} s: {outcome} after {took:.1f} s")
        finally:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    sys.exit(main())
