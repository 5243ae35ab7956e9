#!/usr/bin/env python3
"""Hostile scrapers against the bts-guru metrics listener (RELIABILITY.md, "Hostile client").

usage: benches/hostile_metrics.py target/release/bts-guru

Starts the daemon (1 shard, free loopback ports), then: streams one 300 MB header line without
a newline and prints the daemon's RSS before and after; then keeps 40 connections trickling a
header byte every 200 ms (reopened when cut off) and times 5 real scrapes meanwhile (None: no
answer within 30 s). Not part of CI; tests/metrics.rs checks the same at a smaller scale."""
import os, socket, subprocess, sys, time, threading

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def rss_kib(pid):
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS:"): return int(l.split()[1])

def scrape(port, timeout=10):
    t = time.monotonic()
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while True:
        try:
            b = s.recv(65536)
        except socket.timeout:
            return None
        if not b: break
        data += b
    return (time.monotonic() - t, data[:12])

binary = sys.argv[1]
mport = free_port()
env = dict(os.environ, REVERB_APP_ID="m", REVERB_APP_KEY="mk", REVERB_APP_SECRET="ms", BTS_LOG="warn")
p = subprocess.Popen([binary, "--host", "127.0.0.1", "--port", "0", "--metrics-port", str(mport), "--shards", "1", "--env-file", "/dev/null"], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
p.stdout.readline()
time.sleep(0.5)
scrape(mport)
before = rss_kib(p.pid)
# 1. one header line without a newline, 300 MB
s = socket.create_connection(("127.0.0.1", mport))
s.settimeout(10)
s.sendall(b"GET /metrics HTTP/1.1\r\nX-Long: ")
chunk = b"a" * (1 << 20)
sent = 0
t0 = time.monotonic()
try:
    while sent < 300 << 20:
        sent += s.send(chunk)
except OSError as e:
    err = e.__class__.__name__
else:
    err = "none"
time.sleep(1)
after = rss_kib(p.pid)
print(f"header line without newline: {sent/1e6:.1f} MB accepted before the listener stopped reading ({err}), "
      f"RSS {before} -> {after} KiB (+{after-before} KiB), {time.monotonic()-t0:.1f} s")
s.close()
time.sleep(0.5)
r = scrape(mport, timeout=30)
print(f"scrape after it: {r}")
# 2. slowloris: 40 connections trickling a byte every 200 ms, reopened when cut off
stop = False
def trickle():
    while not stop:
        try:
            c = socket.create_connection(("127.0.0.1", mport), timeout=2)
            c.sendall(b"GET /metrics HTTP/1.1\r\n")
            while not stop:
                c.sendall(b"X"); time.sleep(0.2)
        except OSError:
            time.sleep(0.05)
ts = [threading.Thread(target=trickle, daemon=True) for _ in range(40)]
for t in ts: t.start()
time.sleep(1)
times = []
for _ in range(5):
    r = scrape(mport, timeout=30)
    times.append(None if r is None else round(r[0] * 1000, 1))
    time.sleep(0.3)
stop = True
print(f"5 scrapes while 40 slowloris connections trickle: ms {times}")
p.terminate(); p.wait()
