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

import { isDeepStrictEqual, inspect } from 'node:util';
import PusherJs from 'pusher-js';
import PusherServer from 'pusher';
import EchoModule from 'laravel-echo';
import { Clients, Run, check, expectResponse, installedVersion, MATCH_UPDATE, serverFromArgs, sleep } from './harness.mjs';

const Echo = EchoModule.default ?? EchoModule;
const versions = Object.fromEntries(['pusher-js', 'pusher', 'laravel-echo'].map((p) => [p, installedVersion(p)]));
const { host, port, appId, key, secret } = serverFromArgs('compat.mjs');

const OVERALL_TIMEOUT_MS = 15_000;
const STEP_TIMEOUT_MS = 5_000;
const SETTLE_MS = 300;

const FOOTBALL = 'sports.football';
const LEAGUE = 'sports.football.leagues.premier-league';
const MATCH = 'sports.football.leagues.premier-league.matches.12345';

const MATCH_EVENT = { match_id: 12345, type: 'goal', team_id: 101, player: 'Player 9', minute: 74 };
const BATCH = [
  { channel: LEAGUE, name: 'batch.one', data: { seq: 1 } },
  { channel: FOOTBALL, name: 'batch.two', data: { seq: 2, note: 'ünïcödé ⚽' } },
  { channel: MATCH, name: 'batch.three', data: { seq: 3, nested: { list: [1, 2, 3], flag: true, none: null } } },
];
const EXCLUDED = { only: 'the second client', match_id: 12345 };
const MARKER = { marker: true };

// ---------------------------------------------------------------------------------------------
// The run: pusher-js's log kept for the failure report, and any warning or error it logs (other
// than the deprecation notice for `disableStats`, which Echo-style options still pass) fails it;
// every failure path tears the clients (and Echo) down.

let echo = null;
const run = new Run({
  overallMs: OVERALL_TIMEOUT_MS,
  stepMs: STEP_TIMEOUT_MS,
  teardown: () => {
    try {
      echo?.disconnect();
    } catch {}
    clients.teardown();
  },
});
const clients = new Clients(run, { host, port });
run.captureLogs(PusherJs, [/disableStats option is deprecated/]);
const count = (t, channel, event) => clients.got(t, channel, event);

// ---------------------------------------------------------------------------------------------

async function main() {
  const summary = { ok: false, versions, host, port };

  run.step = 'connect pusher-js client A';
  const a = clients.track('client A', new PusherJs(key, clients.pusherJsOptions()));
  const socketA = await clients.connect(a);
  summary.socket_id = socketA;

  run.step = 'subscribe client A';
  await clients.subscribe(a, LEAGUE);
  await clients.subscribe(a, FOOTBALL);
  await clients.subscribe(a, MATCH);

  run.step = 'connect and subscribe pusher-js client B';
  const b = clients.track('client B', new PusherJs(key, clients.pusherJsOptions()));
  const socketB = await clients.connect(b);
  check(socketB !== socketA, `clients A and B got the same socket_id ${socketA}`);
  await clients.subscribe(b, LEAGUE);

  run.step = 'connect Laravel Echo';
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
  const e = clients.track('Echo', echo.connector.pusher);
  const echoChannel = echo.channel(LEAGUE);
  clients.record(e, echoChannel.subscription); // the underlying pusher-js channel, to count everything
  // '.match.update': the leading dot opts out of Echo's App\Events namespace prefix.
  echoChannel.listen('.match.update', (data) => echoReceived.push({ event: 'match.update', data }));
  echoChannel.listen('.match.excluded', (data) => echoReceived.push({ event: 'match.excluded', data }));
  await run.withTimeout(
    new Promise((resolve, reject) => {
      echoChannel.subscribed(resolve);
      echoChannel.error((err) => reject(new Error(`Echo: subscription to ${LEAGUE} failed: ${inspect(err)}`)));
    }),
    `Echo: subscribed on ${LEAGUE}`,
  );
  summary.echo_socket_id = echo.socketId();

  run.step = 'official SDK';
  const sdk = new PusherServer({ appId, key, secret, host, port: String(port), useTLS: false });

  run.step = 'trigger match.update';
  summary.trigger_response = await expectResponse(sdk.trigger(LEAGUE, 'match.update', MATCH_UPDATE), 'trigger match.update');
  await run.until(
    () => count(a, LEAGUE, 'match.update').length > 0 && count(b, LEAGUE, 'match.update').length > 0 && echoReceived.some((r) => r.event === 'match.update'),
    'match.update at clients A, B and Echo',
  );

  run.step = 'trigger match.event to three channels';
  await expectResponse(sdk.trigger([FOOTBALL, LEAGUE, MATCH], 'match.event', MATCH_EVENT), 'trigger match.event to 3 channels');
  await run.until(() => [FOOTBALL, LEAGUE, MATCH].every((ch) => count(a, ch, 'match.event').length > 0), 'match.event on all three channels at client A');

  run.step = 'triggerBatch';
  const batchSent = structuredClone(BATCH); // the SDK JSON-encodes `data` in place
  summary.batch_response = await expectResponse(sdk.triggerBatch(batchSent), 'triggerBatch of 3');
  await run.until(() => BATCH.every((ev) => count(a, ev.channel, ev.name).length > 0), 'the three batch events at client A');

  run.step = 'trigger with socket_id exclusion';
  await expectResponse(sdk.trigger(LEAGUE, 'match.excluded', EXCLUDED, { socket_id: socketA }), 'trigger match.excluded with socket_id');
  // A follow-up event without exclusion: once A has it, A would have had the excluded one too.
  await expectResponse(sdk.trigger(LEAGUE, 'match.marker', MARKER), 'trigger match.marker');
  await run.until(
    () => count(a, LEAGUE, 'match.marker').length > 0 && count(b, LEAGUE, 'match.marker').length > 0 && count(e, LEAGUE, 'match.marker').length > 0,
    'match.marker at clients A, B and Echo',
  );

  run.step = 'settle';
  await sleep(SETTLE_MS);

  run.step = 'verify';
  // match.update: exactly once, payload deep-equal to the object the SDK sent.
  clients.expectOnce(a, LEAGUE, 'match.update', MATCH_UPDATE);
  clients.expectOnce(b, LEAGUE, 'match.update', MATCH_UPDATE);
  const echoUpdates = echoReceived.filter((r) => r.event === 'match.update');
  check(echoUpdates.length === 1, `Echo: expected .match.update once, got ${echoUpdates.length}`);
  check(isDeepStrictEqual(echoUpdates[0].data, MATCH_UPDATE), `Echo: .match.update data differs: ${inspect(echoUpdates[0].data, { depth: 5 })}`);
  // match.event: once per channel at A (subscribed to all three), once at B (league only).
  for (const ch of [FOOTBALL, LEAGUE, MATCH]) clients.expectOnce(a, ch, 'match.event', MATCH_EVENT);
  clients.expectOnce(b, LEAGUE, 'match.event', MATCH_EVENT);
  check(count(b, FOOTBALL, 'match.event').length + count(b, MATCH, 'match.event').length === 0, 'client B got match.event on a channel it never subscribed to');
  // triggerBatch: each event once, on its own channel, in the order of the batch.
  for (const ev of BATCH) clients.expectOnce(a, ev.channel, ev.name, ev.data);
  const batchOrder = a.received.filter((r) => r.event.startsWith('batch.')).map((r) => r.event);
  check(isDeepStrictEqual(batchOrder, BATCH.map((ev) => ev.name)), `client A got the batch out of order: ${batchOrder.join(', ')}`);
  clients.expectOnce(b, LEAGUE, 'batch.one', BATCH[0].data);
  check(b.received.filter((r) => r.event === 'batch.two' || r.event === 'batch.three').length === 0, 'client B got batch events for channels it never subscribed to');
  // socket_id exclusion: A (the excluded socket) never got it; B and Echo got it once.
  check(count(a, LEAGUE, 'match.excluded').length === 0, `client A (socket_id ${socketA}) got match.excluded although the trigger excluded it`);
  clients.expectOnce(b, LEAGUE, 'match.excluded', EXCLUDED);
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
  run.checkNoWarnings();
  summary.received = Object.fromEntries([a, b, e].map((t) => [t.label, t.received.length]));

  run.step = 'disconnect';
  echo.disconnect();
  a.client.disconnect();
  b.client.disconnect();
  await run.until(() => [a, b, e].every((t) => t.client.connection.state === 'disconnected'), 'all clients to disconnect');
  for (const t of [a, b, e]) {
    check(t.errors.length === 0, `${t.label}: protocol errors while disconnecting: ${inspect(t.errors, { depth: 5 })}`);
  }

  run.checkNoWarnings(' while disconnecting');

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

run.finish(main);
