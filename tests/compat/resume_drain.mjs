// Resume across a server drain (4200) onto a new process, with pusher-js 8 and the served
// script (see tests/resume_pusher_js.rs, which runs this beside a two-process restart on one
// port in cluster mode, so the new process reads the history from Redis).
//
// The client connects through a TCP proxy, subscribes, gets two events; then the proxy holds new
// connections and the script writes "ready" to the marker file. The test starts process B on the
// same port and sends SIGTERM to A: A closes the client with 4200, pusher-js reconnects (held by
// the proxy), four events are published (to B: A's listener is closed), the proxy lets the
// reconnect through to B, and the four arrive once, in order, then bts:recovered
// {recovered: true, missed: 4}, then a live one.
//
// Usage: node resume_drain.mjs host port appId key secret markerFile

import { writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import PusherJs from 'pusher-js';
import PusherServer from 'pusher';
import { Clients, Run, check, expectEqual, serverFromArgs, tcpProxy } from './harness.mjs';

const { host, port, appId, key, secret } = serverFromArgs('resume_drain.mjs');
const marker = process.argv[7];
const CHANNEL = 'sports.drain-1';
let px;
const run = new Run({
  overallMs: 40_000,
  stepMs: 15_000,
  teardown: () => {
    clients.teardown();
    px?.close();
  },
});
const clients = new Clients(run, { host, port });
run.captureLogs(PusherJs, [/disableStats option is deprecated/, /Error/i, /close/i, /4200/]);

async function main() {
  const summary = { ok: false };
  run.step = 'load the served script';
  const res = await fetch(`http://${host}:${port}/bts-guru/resume.js`);
  check(res.status === 200, `GET /bts-guru/resume.js: ${res.status}`);
  const dir = mkdtempSync(join(tmpdir(), 'bts-resume-drain-'));
  writeFileSync(join(dir, 'resume.js'), await res.text());
  const BtsGuruResume = createRequire(import.meta.url)(join(dir, 'resume.js'));

  run.step = 'connect through the proxy and subscribe';
  px = await tcpProxy(host, port);
  const t = clients.track('pusher-js', new PusherJs(key, clients.pusherJsOptions({ wsHost: '127.0.0.1', wsPort: px.server.address().port })));
  BtsGuruResume.attach(t.client);
  t.log = [];
  t.codes = [];
  t.client.connection.bind('error', (e) => t.codes.push(e?.data?.code ?? e?.error?.data?.code ?? null));
  await clients.connect(t);
  const ch = t.client.subscribe(CHANNEL);
  ch.bind_global((event, data) => {
    if (event.startsWith('pusher:') || event.startsWith('pusher_internal:')) return;
    t.log.push(event === 'bts:recovered' ? { recovered: data } : data);
  });
  await clients.subscribed(t, ch, CHANNEL, true);
  const sdk = new PusherServer({ appId, key, secret, host, port: String(port), useTLS: false });
  const publish = async (names) => {
    for (const n of names) {
      const r = await sdk.trigger(CHANNEL, 'goal', { n });
      check(r.status === 200, `trigger ${n}: ${r.status}`);
    }
  };
  await publish(['g1', 'g2']);
  await run.until(() => t.log.length === 2, 'g1, g2');

  run.step = 'wait for the drain (4200)';
  px.paused = true;
  writeFileSync(marker, 'ready');
  await run.until(() => t.client.connection.state !== 'connected', 'the old process to close the connection', 20_000);
  summary.states = [...t.states];

  run.step = 'publish while the client is away, then let it reach the new process';
  await publish(['g3', 'g4', 'g5', 'g6']);
  px.unpause();
  await run.until(() => t.log.length === 2 + 4 + 1, 'the replay and bts:recovered');
  await publish(['g7']);
  await run.until(() => t.log.length === 8, 'g7 live');
  expectEqual(
    t.log,
    [{ n: 'g1' }, { n: 'g2' }, { n: 'g3' }, { n: 'g4' }, { n: 'g5' }, { n: 'g6' }, { recovered: { recovered: true, missed: 4 } }, { n: 'g7' }],
    'every goal once, in order, across the drain',
  );
  summary.drain = { missed: 4, recovered: true };
  summary.ok = true;
  return summary;
}

run.finish(main);
