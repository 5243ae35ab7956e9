// Client-compatibility check for bts-guru, driven by the real JavaScript clients a Laravel app uses:
// pusher-js 8 (the Node build) configured the way Laravel Echo's 'reverb' broadcaster configures it,
// Laravel Echo 2 itself, and the official `pusher` Node server SDK for the HTTP API.
//
// Usage: node compat.mjs [host port appId key secret]
//   or set REVERB_HOST, REVERB_PORT, REVERB_APP_ID, REVERB_APP_KEY, REVERB_APP_SECRET.
// Prints one JSON summary line on stdout and exits 0 when every check passes; otherwise prints
// `compat: FAIL: <why>` on stderr and exits 1. Gives up after 15 s overall.
//
// Run by tests/compat_pusher_js.rs. Install the pinned clients first: npm ci --prefix tests/compat

import { readFileSync } from 'node:fs';
import { isDeepStrictEqual, inspect } from 'node:util';
import PusherJs from 'pusher-js';
import PusherServer from 'pusher';
import EchoModule from 'laravel-echo';

const Echo = EchoModule.default ?? EchoModule;
// Read straight from node_modules: laravel-echo's `exports` map does not expose package.json.
const installedVersion = (pkg) =>
  JSON.parse(readFileSync(new URL(`./node_modules/${pkg}/package.json`, import.meta.url), 'utf8')).version;
const versions = Object.fromEntries(['pusher-js', 'pusher', 'laravel-echo'].map((p) => [p, installedVersion(p)]));

const argv = process.argv.slice(2);
const env = process.env;
const host = argv[0] ?? env.REVERB_HOST ?? '127.0.0.1';
const port = Number(argv[1] ?? env.REVERB_PORT ?? 8080);
const appId = argv[2] ?? env.REVERB_APP_ID;
const key = argv[3] ?? env.REVERB_APP_KEY;
const secret = argv[4] ?? env.REVERB_APP_SECRET;
if (!appId || !key || !secret || !Number.isInteger(port) || port <= 0) {
  process.stderr.write('usage: node compat.mjs host port appId key secret (or REVERB_HOST, REVERB_PORT, REVERB_APP_ID, REVERB_APP_KEY, REVERB_APP_SECRET)\n');
  process.exit(2);
}

const OVERALL_TIMEOUT_MS = 15_000;
const STEP_TIMEOUT_MS = 5_000;
const SETTLE_MS = 300;

const FOOTBALL = 'sports.football';
const LEAGUE = 'sports.football.leagues.premier-league';
const MATCH = 'sports.football.leagues.premier-league.matches.12345';

const MATCH_UPDATE = {
  match_id: 12345,
  sport_id: 'football',
  league_id: 'premier-league',
  status: 'live',
  home_team: { id: 101, name: 'Team A', score: 2 },
  away_team: { id: 102, name: 'Team B', score: 1 },
  period: '2nd Half',
  time: '75:00',
  last_updated: '2025-05-14T01:35:00Z',
};
const MATCH_EVENT = { match_id: 12345, type: 'goal', team_id: 101, player: 'Player 9', minute: 74 };
const BATCH = [
  { channel: LEAGUE, name: 'batch.one', data: { seq: 1 } },
  { channel: FOOTBALL, name: 'batch.two', data: { seq: 2, note: 'ünïcödé ⚽' } },
  { channel: MATCH, name: 'batch.three', data: { seq: 3, nested: { list: [1, 2, 3], flag: true, none: null } } },
];
const EXCLUDED = { only: 'the second client', match_id: 12345 };
const MARKER = { marker: true };

// ---------------------------------------------------------------------------------------------
// pusher-js logging: debug lines are kept for the failure report; any warning or error it logs
// (other than the deprecation notice for `disableStats`, which Echo-style options still pass) fails
// the run. pusher-js only logs through console.* when logToConsole is set, so route console.* here;
// this script itself writes to process.stdout / process.stderr directly.

const pusherLog = [];
const pusherWarnings = [];
const IGNORED_WARNINGS = [/disableStats option is deprecated/];
PusherJs.logToConsole = true;
console.log = (...args) => pusherLog.push(args.map(String).join(' '));
console.info = console.log;
console.debug = console.log;
console.warn = console.error = (...args) => {
  const line = args.map(String).join(' ');
  pusherLog.push(`WARN ${line}`);
  if (!IGNORED_WARNINGS.some((re) => re.test(line))) pusherWarnings.push(line);
};

// ---------------------------------------------------------------------------------------------
// Failure handling: every failure path ends here, with the clients torn down.

const clients = [];
let echo = null;
let finished = false;

function teardown() {
  try {
    echo?.disconnect();
  } catch {}
  for (const c of clients) {
    try {
      c.disconnect();
    } catch {}
  }
}

function fail(msg) {
  if (finished) return;
  finished = true;
  process.stderr.write(`compat: FAIL: ${msg}\n`);
  if (pusherLog.length) {
    process.stderr.write(`compat: last pusher-js log lines:\n${pusherLog.slice(-40).map((l) => `  ${l}`).join('\n')}\n`);
  }
  teardown();
  // Give the close frames a moment to go out, then leave regardless.
  setTimeout(() => process.exit(1), 200).unref();
  process.exitCode = 1;
}

const overall = setTimeout(
  () => fail(`overall timeout: not done after ${OVERALL_TIMEOUT_MS / 1000} s (last step: ${step})`),
  OVERALL_TIMEOUT_MS,
);
process.on('unhandledRejection', (e) => fail(`unhandled rejection in step "${step}": ${e?.stack ?? e}`));
process.on('uncaughtException', (e) => fail(`uncaught exception in step "${step}": ${e?.stack ?? e}`));

let step = 'start';
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function check(cond, msg) {
  if (!cond) throw new Error(msg);
}

function withTimeout(promise, what, ms = STEP_TIMEOUT_MS) {
  let t;
  return Promise.race([
    promise,
    new Promise((_, reject) => {
      t = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
    }),
  ]).finally(() => clearTimeout(t));
}

/// Resolves once `pred()` holds, polling; rejects after `ms`.
async function until(pred, what, ms = STEP_TIMEOUT_MS) {
  const deadline = Date.now() + ms;
  while (!pred()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(10);
  }
}

// ---------------------------------------------------------------------------------------------
// pusher-js clients with the options Laravel Echo's 'reverb' broadcaster uses.

function pusherJsOptions() {
  return {
    wsHost: host,
    wsPort: port,
    wssPort: port,
    forceTLS: false,
    enabledTransports: ['ws'],
    cluster: 'mt1',
    disableStats: true,
  };
}

/// A pusher-js client that records everything it receives and every protocol-level problem.
function trackedClient(label, client) {
  const t = {
    label,
    client,
    received: [], // { channel, event, data } for every non-internal event on any channel
    errors: [], // pusher:error events, connection errors, subscription errors
    states: [client.connection.state],
  };
  client.connection.bind('state_change', ({ current }) => t.states.push(current));
  client.connection.bind('error', (e) => t.errors.push({ kind: 'connection error', detail: summarize(e) }));
  client.bind('pusher:error', (e) => t.errors.push({ kind: 'pusher:error', detail: summarize(e) }));
  clients.push(client);
  return t;
}

function summarize(e) {
  try {
    return JSON.parse(JSON.stringify(e, (k, v) => (k === 'target' || k === 'currentTarget' ? undefined : v)));
  } catch {
    return inspect(e, { depth: 3 });
  }
}

async function connect(t) {
  if (t.client.connection.state !== 'connected') {
    await withTimeout(
      new Promise((resolve, reject) => {
        t.client.connection.bind('connected', resolve);
        t.client.connection.bind('failed', () => reject(new Error(`${t.label}: connection failed`)));
        t.client.connection.bind('unavailable', () => reject(new Error(`${t.label}: connection unavailable`)));
      }),
      `${t.label} to connect`,
    );
  }
  const sid = t.client.connection.socket_id;
  check(/^\d+\.\d+$/.test(sid ?? ''), `${t.label}: socket_id ${inspect(sid)} is not "<digits>.<digits>"`);
  return sid;
}

/// Records every non-internal event pusher-js delivers on `ch` into `t.received`.
function record(t, ch) {
  ch.bind_global((event, data) => {
    if (event.startsWith('pusher:') || event.startsWith('pusher_internal:')) return;
    t.received.push({ channel: ch.name, event, data });
  });
}

async function subscribe(t, channelName) {
  const ch = t.client.subscribe(channelName);
  record(t, ch);
  await withTimeout(
    new Promise((resolve, reject) => {
      if (ch.subscribed) return resolve();
      ch.bind('pusher:subscription_succeeded', resolve);
      ch.bind('pusher:subscription_error', (e) => {
        t.errors.push({ kind: 'subscription_error', channel: channelName, detail: summarize(e) });
        reject(new Error(`${t.label}: subscription to ${channelName} failed: ${inspect(e)}`));
      });
    }),
    `${t.label}: pusher:subscription_succeeded on ${channelName}`,
  );
  return ch;
}

const count = (t, channel, event) => t.received.filter((r) => r.channel === channel && r.event === event);

function expectOnce(t, channel, event, data) {
  const got = count(t, channel, event);
  check(got.length === 1, `${t.label}: expected "${event}" on ${channel} exactly once, got it ${got.length} times: ${inspect(got, { depth: 5 })}`);
  check(
    isDeepStrictEqual(got[0].data, data),
    `${t.label}: "${event}" on ${channel} data differs:\n  sent ${inspect(data, { depth: 5 })}\n  got  ${inspect(got[0].data, { depth: 5 })}`,
  );
}

async function expectResponse(promise, what) {
  let res;
  try {
    res = await promise;
  } catch (e) {
    // The SDK rejects with a RequestError carrying status and body for non-2xx responses.
    throw new Error(`${what}: HTTP API request failed: status ${e?.status} body ${inspect(e?.body)} (${e?.message ?? e})`);
  }
  const body = await res.text();
  check(res.status === 200, `${what}: HTTP status ${res.status}, body ${body}`);
  let parsed;
  try {
    parsed = JSON.parse(body);
  } catch {
    throw new Error(`${what}: response body is not JSON: ${inspect(body)}`);
  }
  return parsed;
}

// ---------------------------------------------------------------------------------------------

async function main() {
  const summary = { ok: false, versions, host, port };

  step = 'connect pusher-js client A';
  const a = trackedClient('client A', new PusherJs(key, pusherJsOptions()));
  const socketA = await connect(a);
  summary.socket_id = socketA;

  step = 'subscribe client A';
  await subscribe(a, LEAGUE);
  await subscribe(a, FOOTBALL);
  await subscribe(a, MATCH);

  step = 'connect and subscribe pusher-js client B';
  const b = trackedClient('client B', new PusherJs(key, pusherJsOptions()));
  const socketB = await connect(b);
  check(socketB !== socketA, `clients A and B got the same socket_id ${socketA}`);
  await subscribe(b, LEAGUE);

  step = 'connect Laravel Echo';
  // Exactly how a Laravel app's resources/js/echo.js sets it up for Reverb, with the Pusher
  // client class passed in instead of window.Pusher.
  const echoReceived = [];
  echo = new Echo({
    broadcaster: 'reverb',
    key,
    wsHost: host,
    wsPort: port,
    wssPort: port,
    forceTLS: false,
    enabledTransports: ['ws'],
    disableStats: true,
    Pusher: PusherJs,
  });
  const e = trackedClient('Echo', echo.connector.pusher);
  const echoChannel = echo.channel(LEAGUE);
  record(e, echoChannel.subscription); // the underlying pusher-js channel, to count everything
  // '.match.update': the leading dot opts out of Echo's App\Events namespace prefix.
  echoChannel.listen('.match.update', (data) => echoReceived.push({ event: 'match.update', data }));
  echoChannel.listen('.match.excluded', (data) => echoReceived.push({ event: 'match.excluded', data }));
  await withTimeout(
    new Promise((resolve, reject) => {
      echoChannel.subscribed(resolve);
      echoChannel.error((err) => reject(new Error(`Echo: subscription to ${LEAGUE} failed: ${inspect(err)}`)));
    }),
    `Echo: subscribed on ${LEAGUE}`,
  );
  summary.echo_socket_id = echo.socketId();

  step = 'official SDK';
  const sdk = new PusherServer({ appId, key, secret, host, port: String(port), useTLS: false });

  step = 'trigger match.update';
  summary.trigger_response = await expectResponse(sdk.trigger(LEAGUE, 'match.update', MATCH_UPDATE), 'trigger match.update');
  await until(
    () => count(a, LEAGUE, 'match.update').length > 0 && count(b, LEAGUE, 'match.update').length > 0 && echoReceived.some((r) => r.event === 'match.update'),
    'match.update at clients A, B and Echo',
  );

  step = 'trigger match.event to three channels';
  await expectResponse(sdk.trigger([FOOTBALL, LEAGUE, MATCH], 'match.event', MATCH_EVENT), 'trigger match.event to 3 channels');
  await until(() => [FOOTBALL, LEAGUE, MATCH].every((ch) => count(a, ch, 'match.event').length > 0), 'match.event on all three channels at client A');

  step = 'triggerBatch';
  const batchSent = structuredClone(BATCH); // the SDK JSON-encodes `data` in place
  summary.batch_response = await expectResponse(sdk.triggerBatch(batchSent), 'triggerBatch of 3');
  await until(() => BATCH.every((ev) => count(a, ev.channel, ev.name).length > 0), 'the three batch events at client A');

  step = 'trigger with socket_id exclusion';
  await expectResponse(sdk.trigger(LEAGUE, 'match.excluded', EXCLUDED, { socket_id: socketA }), 'trigger match.excluded with socket_id');
  // A follow-up event without exclusion: once A has it, A would have had the excluded one too.
  await expectResponse(sdk.trigger(LEAGUE, 'match.marker', MARKER), 'trigger match.marker');
  await until(
    () => count(a, LEAGUE, 'match.marker').length > 0 && count(b, LEAGUE, 'match.marker').length > 0 && count(e, LEAGUE, 'match.marker').length > 0,
    'match.marker at clients A, B and Echo',
  );

  step = 'settle';
  await sleep(SETTLE_MS);

  step = 'verify';
  // match.update: exactly once, payload deep-equal to the object the SDK sent.
  expectOnce(a, LEAGUE, 'match.update', MATCH_UPDATE);
  expectOnce(b, LEAGUE, 'match.update', MATCH_UPDATE);
  const echoUpdates = echoReceived.filter((r) => r.event === 'match.update');
  check(echoUpdates.length === 1, `Echo: expected .match.update once, got ${echoUpdates.length}`);
  check(isDeepStrictEqual(echoUpdates[0].data, MATCH_UPDATE), `Echo: .match.update data differs: ${inspect(echoUpdates[0].data, { depth: 5 })}`);
  // match.event: once per channel at A (subscribed to all three), once at B (league only).
  for (const ch of [FOOTBALL, LEAGUE, MATCH]) expectOnce(a, ch, 'match.event', MATCH_EVENT);
  expectOnce(b, LEAGUE, 'match.event', MATCH_EVENT);
  check(count(b, FOOTBALL, 'match.event').length + count(b, MATCH, 'match.event').length === 0, 'client B got match.event on a channel it never subscribed to');
  // triggerBatch: each event once, on its own channel, in the order of the batch.
  for (const ev of BATCH) expectOnce(a, ev.channel, ev.name, ev.data);
  const batchOrder = a.received.filter((r) => r.event.startsWith('batch.')).map((r) => r.event);
  check(isDeepStrictEqual(batchOrder, BATCH.map((ev) => ev.name)), `client A got the batch out of order: ${batchOrder.join(', ')}`);
  expectOnce(b, LEAGUE, 'batch.one', BATCH[0].data);
  check(b.received.filter((r) => r.event === 'batch.two' || r.event === 'batch.three').length === 0, 'client B got batch events for channels it never subscribed to');
  // socket_id exclusion: A (the excluded socket) never got it; B and Echo got it once.
  check(count(a, LEAGUE, 'match.excluded').length === 0, `client A (socket_id ${socketA}) got match.excluded although the trigger excluded it`);
  expectOnce(b, LEAGUE, 'match.excluded', EXCLUDED);
  check(echoReceived.filter((r) => r.event === 'match.excluded').length === 1, 'Echo: expected .match.excluded once');
  // Nothing unexpected: every event each client got is accounted for above.
  const expectedCounts = { 'client A': 3 + 1 + 3 + 1, 'client B': 1 + 1 + 1 + 1 + 1, Echo: 1 + 1 + 1 + 1 + 1 };
  for (const t of [a, b, e]) {
    check(t.received.length === expectedCounts[t.label], `${t.label}: expected ${expectedCounts[t.label]} events in all, got ${t.received.length}: ${inspect(t.received.map((r) => `${r.channel} ${r.event}`))}`);
    check(t.errors.length === 0, `${t.label}: protocol errors: ${inspect(t.errors, { depth: 5 })}`);
    check(
      // pusher-js starts connecting inside its constructor, so the first state seen is 'connecting'.
      isDeepStrictEqual(t.states.filter((s) => s !== 'initialized'), ['connecting', 'connected']),
      `${t.label}: unexpected connection state changes: ${t.states.join(' -> ')}`,
    );
  }
  check(pusherWarnings.length === 0, `pusher-js logged warnings/errors: ${inspect(pusherWarnings)}`);
  summary.received = Object.fromEntries([a, b, e].map((t) => [t.label, t.received.length]));

  step = 'disconnect';
  echo.disconnect();
  a.client.disconnect();
  b.client.disconnect();
  await until(() => [a, b, e].every((t) => t.client.connection.state === 'disconnected'), 'all clients to disconnect');
  for (const t of [a, b, e]) {
    check(t.errors.length === 0, `${t.label}: protocol errors while disconnecting: ${inspect(t.errors, { depth: 5 })}`);
  }

  check(pusherWarnings.length === 0, `pusher-js logged warnings/errors while disconnecting: ${inspect(pusherWarnings)}`);

  summary.ok = true;
  summary.echo = 'ok';
  summary.checks = [
    'pusher-js connect',
    'subscribe x3',
    'match.update deep-equal once (A, B, Echo)',
    'match.event to 3 channels once each',
    'triggerBatch x3 once each, in order',
    'socket_id exclusion',
    'no pusher:error, no reconnects',
    'clean disconnect',
  ];
  return summary;
}

main().then(
  (summary) => {
    if (finished) return;
    finished = true;
    clearTimeout(overall);
    process.stdout.write(`${JSON.stringify(summary)}\n`);
    process.exit(0);
  },
  (err) => fail(`step "${step}": ${err?.message ?? err}`),
);
