// Resume on reconnect with unmodified pusher-js 8 and Laravel Echo 2, through the script the
// daemon serves (see tests/resume_pusher_js.rs, which starts the daemon with `sports.*`
// positioned and a history of 20 events per channel).
//
// 1. The served script loads three ways: require() of /bts-guru/resume.js, an ES module import
//    of /bts-guru/resume.mjs, and /bts-guru/resume.js run as a classic <script> (a window
//    global), with the right Content-Type and caching headers.
// 2. Kill the socket (a TCP proxy between client and server drops every connection and refuses
//    new ones while N events are published), let pusher-js reconnect: the N events arrive once,
//    in order, before the live ones, then bts:recovered {recovered: true, missed: N}.
// 3. Laravel Echo: disconnect(), N events, connect(): the same, seen through Echo's listen().
// 4. A gap longer than the history: bts:recovered {recovered: false, missed: M}, no event of the
//    gap (no partial replay), then live events.
// 5. A stock pusher-js client on the same channel (no script) sees every event live and plain,
//    and no bts:recovered.
//
// Usage: node resume.mjs host port appId key secret

import { mkdtempSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import vm from 'node:vm';
import PusherJs from 'pusher-js';
import PusherServer from 'pusher';
import EchoModule from 'laravel-echo';
import { Clients, Run, check, expectEqual, installedVersion, serverFromArgs, show, tcpProxy } from './harness.mjs';

const Echo = EchoModule.default ?? EchoModule;
const { host, port, appId, key, secret } = serverFromArgs('resume.mjs');
const CHANNEL = 'sports.match-7';
const HISTORY = 20;

let echo;
const proxies = [];
const run = new Run({
  overallMs: 40_000,
  stepMs: 8_000,
  teardown: () => {
    try {
      echo?.disconnect();
    } catch {}
    clients.teardown();
    for (const p of proxies) p.close();
  },
});
const clients = new Clients(run, { host, port });
// pusher-js warns when its socket is cut (that is the test), and about disableStats.
run.captureLogs(PusherJs, [/disableStats option is deprecated/, /Error/i, /close/i]);

async function fetchScript(path) {
  const res = await fetch(`http://${host}:${port}${path}`);
  check(res.status === 200, `GET ${path}: ${res.status}`);
  const headers = {
    type: res.headers.get('content-type'),
    cache: res.headers.get('cache-control'),
    cors: res.headers.get('access-control-allow-origin'),
  };
  expectEqual(headers, { type: 'text/javascript; charset=utf-8', cache: 'public, max-age=3600', cors: '*' }, `${path} headers`);
  return res.text();
}

/// A tracked pusher-js client that records, in one ordered list, the events and bts:recovered
/// it gets on CHANNEL.
function recorder(label, client) {
  const t = clients.track(label, client);
  t.log = [];
  return t;
}

function bindLog(t, channel) {
  channel.bind_global((event, data) => {
    if (event.startsWith('pusher:') || event.startsWith('pusher_internal:')) return;
    t.log.push(event === 'bts:recovered' ? { recovered: data } : data);
  });
}

const goals = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => `g${from + i}`);

async function main() {
  const t0 = Date.now();
  const steps = {};
  const mark = (name) => (steps[name] = Date.now() - t0);
  const summary = { ok: false, steps, versions: { 'pusher-js': installedVersion('pusher-js'), 'laravel-echo': installedVersion('laravel-echo') } };

  run.step = 'load the served script three ways';
  const dir = mkdtempSync(join(tmpdir(), 'bts-resume-'));
  const umd = await fetchScript('/bts-guru/resume.js');
  const esm = await fetchScript('/bts-guru/resume.mjs');
  writeFileSync(join(dir, 'resume.js'), umd);
  writeFileSync(join(dir, 'resume.mjs'), esm);
  const required = createRequire(import.meta.url)(join(dir, 'resume.js'));
  const imported = (await import(pathToFileURL(join(dir, 'resume.mjs')).href)).default;
  const windowObj = {};
  vm.runInNewContext(umd, { window: windowObj, self: windowObj });
  for (const [how, lib] of [['require', required], ['import', imported], ['<script>', windowObj.BtsGuruResume]]) {
    check(lib && typeof lib.attach === 'function', `${how}: no attach() in ${show(lib)}`);
  }
  summary.loaded = ['require', 'import', 'script'];

  const sdk = new PusherServer({ appId, key, secret, host, port: String(port), useTLS: false });
  const publish = async (names) => {
    for (const n of names) {
      const res = await sdk.trigger(CHANNEL, 'goal', { n });
      check(res.status === 200, `trigger ${n}: ${res.status}`);
    }
  };

  run.step = 'connect: pusher-js with the script (through a proxy), a stock pusher-js, Echo with the script';
  const px = await tcpProxy(host, port);
  proxies.push(px);
  const r = recorder('resuming pusher-js', new PusherJs(key, clients.pusherJsOptions({ wsHost: '127.0.0.1', wsPort: px.server.address().port })));
  required.attach(r.client);
  await clients.connect(r);
  const rch = r.client.subscribe(CHANNEL);
  bindLog(r, rch);
  await clients.subscribed(r, rch, CHANNEL, true);

  const s = recorder('stock pusher-js', new PusherJs(key, clients.pusherJsOptions()));
  await clients.connect(s);
  const sch = s.client.subscribe(CHANNEL);
  bindLog(s, sch);
  await clients.subscribed(s, sch, CHANNEL, true);

  echo = new Echo({ broadcaster: 'reverb', key, wsHost: host, wsPort: port, wssPort: port, forceTLS: false, enabledTransports: ['ws'], disableStats: true, Pusher: PusherJs });
  imported.attach(echo.connector.pusher);
  const e = clients.track('Echo', echo.connector.pusher);
  e.log = [];
  const ech = echo.channel(CHANNEL);
  ech.listen('.goal', (data) => e.log.push(data)).listen('.bts:recovered', (data) => e.log.push({ recovered: data }));
  await run.withTimeout(new Promise((resolve) => ech.subscribed(resolve)), 'Echo subscribed');

  run.step = 'live events before any break';
  await publish(goals(1, 2));
  await run.until(() => r.log.length === 2 && s.log.length === 2 && e.log.length === 2, 'g1, g2 everywhere');

  run.step = 'kill the socket: N events while the network is down, then pusher-js reconnects';
  px.paused = true;
  px.cut();
  await run.until(() => r.client.connection.state !== 'connected', 'pusher-js to notice the cut');
  await publish(goals(3, 7));
  const acceptedBefore = px.accepted;
  px.unpause();
  await run.until(() => r.log.length === 2 + 5 + 1, 'the replay and bts:recovered', 15_000);
  check(px.accepted > acceptedBefore, 'pusher-js reconnected through the proxy');
  await publish(goals(8, 8));
  await run.until(() => r.log.length === 9, 'g8 live');
  expectEqual(
    r.log,
    [...goals(1, 7).map((n) => ({ n })), { recovered: { recovered: true, missed: 5 } }, { n: 'g8' }],
    'resuming pusher-js: g1..g7 once, in order, then bts:recovered, then g8',
  );
  summary.socket_cut = { missed: 5, recovered: true };
  mark('socket_cut');

  run.step = 'Echo: disconnect(), N events, connect()';
  const p = echo.connector.pusher;
  p.disconnect();
  await run.until(() => p.connection.state === 'disconnected', 'Echo disconnected');
  await publish(goals(9, 11));
  p.connect();
  await run.until(() => e.log.length === 8 + 3 + 1, 'Echo: the replay and bts:recovered');
  await publish(goals(12, 12));
  await run.until(() => e.log.length === 13, 'Echo: g12 live');
  expectEqual(
    e.log,
    [...goals(1, 8).map((n) => ({ n })), ...goals(9, 11).map((n) => ({ n })), { recovered: { recovered: true, missed: 3 } }, { n: 'g12' }],
    'Echo: every goal once, in order, bts:recovered after the replay',
  );
  summary.echo_reconnect = { missed: 3, recovered: true };
  mark('echo');

  run.step = 'a gap longer than the history: recovered false, no partial replay';
  await run.until(() => r.log.length === 13, 'resuming pusher-js has g9..g12 live');
  px.paused = true;
  px.cut();
  await run.until(() => r.client.connection.state !== 'connected', 'pusher-js to notice the cut');
  const gap = goals(13, 13 + HISTORY + 4);
  await publish(gap);
  px.unpause();
  await run.until(() => r.log.length === 14, 'bts:recovered after a long gap', 15_000);
  await publish(['after']);
  await run.until(() => r.log.length === 15, 'live after the long gap');
  expectEqual(
    r.log.slice(13),
    [{ recovered: { recovered: false, missed: gap.length } }, { n: 'after' }],
    'resuming pusher-js after a gap longer than the history',
  );
  summary.long_gap = { missed: gap.length, recovered: false };
  mark('long_gap');

  run.step = 'the stock client saw everything live and plain';
  await run.until(() => s.log.length === 12 + gap.length + 1, 'stock client caught up');
  expectEqual(s.log, [...goals(1, 12 + gap.length).map((n) => ({ n })), { n: 'after' }], 'stock pusher-js');
  run.checkNoWarnings();
  summary.ok = true;
  return summary;
}

run.finish(main);
