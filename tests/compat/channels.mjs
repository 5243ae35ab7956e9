// Channel-type compatibility check for bts-guru, driven by the real JavaScript clients: Laravel Echo 2
// (broadcaster 'reverb') and pusher-js 8 against the daemon, with every signature made by the official
// `pusher` Node server SDK, which also publishes and reads through the HTTP API. Covers:
//   a. Echo private channel: an SDK event arrives once, deep-equal
//   b. Echo presence channel: here / joining / leaving across two users, one of them in two tabs
//   c. Echo whispers (client events) on the private and the presence channel, never echoed
//   d. pusher-js signin: sendToUser reaches pusher.user, terminateUserConnections closes the client
//   e. pusher-js private-encrypted channel: the SDK encrypts, pusher-js decrypts the plaintext
//   f. cache channels: the last event after subscription_succeeded, else pusher:cache_miss
//   g. SDK reads: /channels with user_count, /channels/<presence>, /channels/<presence>/users
//
// Usage: node channels.mjs [host port appId key secret]
//   or set REVERB_HOST, REVERB_PORT, REVERB_APP_ID, REVERB_APP_KEY, REVERB_APP_SECRET.
// Prints one JSON summary line on stdout and exits 0 when every check passes; otherwise prints
// `compat: FAIL: step "...": <why>` on stderr and exits 1. Gives up after 20 s overall.
//
// Run by tests/compat_channels.rs. Install the pinned clients first: npm ci --prefix tests/compat

import { randomBytes } from 'node:crypto';
import PusherJs from 'pusher-js';
import PusherServer from 'pusher';
import EchoModule from 'laravel-echo';
import { Clients, Run, check, expectEqual, expectResponse, installedVersion, serverFromArgs, show, sleep } from './harness.mjs';

const Echo = EchoModule.default ?? EchoModule;
const versions = Object.fromEntries(['pusher-js', 'pusher', 'laravel-echo'].map((p) => [p, installedVersion(p)]));
const { host, port, appId, key, secret } = serverFromArgs('channels.mjs');

const OVERALL_TIMEOUT_MS = 20_000;
const STEP_TIMEOUT_MS = 5_000;
const SETTLE_MS = 300;

// Echo names, without the prefixes Echo adds.
const PRIVATE_NAME = 'sports.basketball.leagues.nba.matches.12345';
const PRESENCE_NAME = 'sports.football.leagues.premier-league.matches.12345';
const PRIVATE = `private-${PRIVATE_NAME}`;
const PRESENCE = `presence-${PRESENCE_NAME}`;
const ENCRYPTED = 'private-encrypted-sports.odds';
const CACHE = 'cache-sports.football.leagues.premier-league.matches.12345';
const CACHE_EMPTY = 'cache-sports.football.leagues.premier-league.matches.67890';

const ANN = { id: '1', name: 'Ann' };
const BOB = { id: '2', name: 'Bob' };
const SIGNED_IN = { id: '42', name: 'Ann' };

const MATCH_EVENT = { match_id: 12345, sport_id: 'basketball', type: 'three_pointer', team_id: 7, player: 'Player 23', quarter: 4, clock: '01:12' };
const TYPING_PRIVATE = { user: 'Ann', typing: true, draft: 'what a sh…' };
const TYPING_PRESENCE = { user: 'Bob', typing: true, nested: { list: [1, 2, 3], none: null } };
const SCORE_ALERT = { match_id: 12345, home: 2, away: 1, note: 'Goal! ⚽' };
const ODDS = { market: '1x2', match_id: 12345, odds: { home: 1.85, draw: 3.4, away: 4.2 }, note: 'ünïcödé' };
const CACHED_UPDATE = {
  match_id: 12345,
  status: 'live',
  home_team: { id: 101, name: 'Team A', score: 2 },
  away_team: { id: 102, name: 'Team B', score: 1 },
  time: '75:00',
};

// ---------------------------------------------------------------------------------------------
// The run: pusher-js's log kept for the failure report; any warning or error it logs fails it,
// except the `disableStats` deprecation notice (Echo-style options still pass it) and what a
// terminated connection logs while step (d) terminates it on purpose (`run.allowWarnings`).
// Every failure path tears the clients down. A wait stops early when a client reports a protocol
// error (so a refused whisper or subscription says why instead of timing out).

const run = new Run({ overallMs: OVERALL_TIMEOUT_MS, stepMs: STEP_TIMEOUT_MS, logTail: 60, teardown: () => clients.teardown() });
const clients = new Clients(run, { host, port });
run.captureLogs(PusherJs, [/disableStats option is deprecated/]);

function protocolErrors(what) {
  const bad = clients.tracked.find((t) => !t.errorsExpected && t.errors.length > 0);
  return bad ? `${bad.label}: protocol errors while waiting for ${what}: ${show(bad.errors)}` : null;
}

const until = (pred, what, ms = STEP_TIMEOUT_MS) => run.until(pred, what, ms, protocolErrors);
const withTimeout = (promise, what, ms = STEP_TIMEOUT_MS) => run.withTimeout(promise, what, ms);

// ---------------------------------------------------------------------------------------------
// The official server SDK: signs every auth, publishes, reads. `encSdk` also holds an encryption
// master key, so it hands out `shared_secret` for private-encrypted-* and encrypts on trigger.

const sdk = new PusherServer({ appId, key, secret, host, port: String(port), useTLS: false });
const encSdk = new PusherServer({
  appId,
  key,
  secret,
  host,
  port: String(port),
  useTLS: false,
  encryptionMasterKeyBase64: randomBytes(32).toString('base64'),
});

// ---------------------------------------------------------------------------------------------
// Clients: pusher-js with the options Laravel Echo's 'reverb' broadcaster uses, and Echo itself.

const pusherJsOptions = (extra = {}) => clients.pusherJsOptions(extra);

const tracked = (label, client) => clients.track(label, client);

/// Laravel Echo as a Laravel app sets it up for Reverb, with the app's /broadcasting/auth replaced by
/// an `authorizer` that signs with the SDK as that endpoint would for `user`.
function echoClient(label, user) {
  const echo = new Echo({
    broadcaster: 'reverb',
    key,
    wsHost: host,
    wsPort: port,
    wssPort: port,
    forceTLS: false,
    enabledTransports: ['ws'],
    disableStats: true,
    Pusher: PusherJs,
    authorizer: (channel) => ({
      authorize: (socketId, callback) => {
        try {
          const presence = channel.name.startsWith('presence-')
            ? { user_id: user.id, user_info: { name: user.name } }
            : undefined;
          callback(null, sdk.authorizeChannel(socketId, channel.name, presence));
        } catch (e) {
          callback(e, null);
        }
      },
    }),
  });
  const t = tracked(label, echo.connector.pusher);
  t.echo = echo;
  t.user = user;
  return t;
}

const connect = (t) => clients.connect(t);

const record = (t, ch) => clients.record(t, ch);

const subscribed = (t, ch, name, raw = false) => clients.subscribed(t, ch, name, raw);

const got = (t, channel, event) => clients.got(t, channel, event);

const expectOnce = (t, channel, event, data) => clients.expectOnce(t, channel, event, data);

function expectNone(t, channel, event, why) {
  const g = got(t, channel, event);
  check(g.length === 0, `${t.label}: got "${event}" on ${channel} ${g.length} times ${why}: ${show(g)}`);
}

function expectClean(t) {
  check(t.errors.length === 0, `${t.label}: protocol errors: ${show(t.errors)}`);
}

const byId = (a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0);

// ---------------------------------------------------------------------------------------------

async function main() {
  const summary = { ok: false, versions, host, port, checks: [] };
  const passed = (name) => summary.checks.push(name);

  // (f, first half) Published before anyone subscribes: the daemon must keep it for later.
  run.step = 'f: trigger match.update to the cache channel before any subscriber';
  await expectResponse(sdk.trigger(CACHE, 'match.update', CACHED_UPDATE), `trigger match.update to ${CACHE}`);

  // ---- a. Echo private channel ---------------------------------------------------------------
  run.step = 'a: connect Echo clients (user 1, user 2)';
  const e1 = echoClient('Echo user 1', ANN);
  const e2 = echoClient('Echo user 2', BOB);
  await connect(e1);
  await connect(e2);

  run.step = 'a: Echo .private() subscribe';
  const matchEvents = { [e1.label]: [], [e2.label]: [] };
  const whispers = { [e1.label]: [], [e2.label]: [] };
  const priv = {};
  for (const t of [e1, e2]) {
    const ch = t.echo.private(PRIVATE_NAME);
    check(ch.name === PRIVATE, `Echo .private() named the channel ${ch.name}, expected ${PRIVATE}`);
    record(t, ch.subscription);
    ch.listen('.match.event', (data) => matchEvents[t.label].push(data));
    ch.listenForWhisper('typing', (data) => whispers[t.label].push(data));
    priv[t.label] = ch;
  }
  await Promise.all([e1, e2].map((t) => subscribed(t, priv[t.label], PRIVATE)));

  run.step = 'a: SDK trigger on the private channel';
  await expectResponse(sdk.trigger(PRIVATE, 'match.event', MATCH_EVENT), `trigger match.event to ${PRIVATE}`);
  await until(() => matchEvents[e1.label].length > 0 && matchEvents[e2.label].length > 0, `.match.event at both Echo clients on ${PRIVATE}`);

  // ---- c. whisper on the private channel -----------------------------------------------------
  run.step = 'c: whisper on the private channel';
  priv[e1.label].whisper('typing', TYPING_PRIVATE);
  await until(() => whispers[e2.label].length > 0, `Echo user 2 to hear user 1's whisper on ${PRIVATE}`);
  await sleep(SETTLE_MS);
  for (const t of [e1, e2]) {
    check(matchEvents[t.label].length === 1, `${t.label}: expected .match.event once on ${PRIVATE}, got ${matchEvents[t.label].length}`);
    expectEqual(matchEvents[t.label][0], MATCH_EVENT, `${t.label}: .match.event data on ${PRIVATE}`);
    expectOnce(t, PRIVATE, 'match.event', MATCH_EVENT);
  }
  passed('a: Echo private channel, SDK event once, deep-equal (2 clients)');
  check(whispers[e2.label].length === 1, `Echo user 2: expected the whisper once, got ${whispers[e2.label].length}`);
  expectEqual(whispers[e2.label][0], TYPING_PRIVATE, 'Echo user 2: whisper data on the private channel');
  check(whispers[e1.label].length === 0, `Echo user 1 (the sender) heard its own whisper ${whispers[e1.label].length} times: ${show(whispers[e1.label])}`);
  expectNone(e1, PRIVATE, 'client-typing', '(it sent it: client events are never echoed)');
  passed('c: whisper on a private channel reaches the other subscriber once, not the sender');

  // ---- b. Echo presence channel --------------------------------------------------------------
  const presence = {};
  const here = {};
  const joining = {};
  const leaving = {};
  const presenceWhispers = {};
  function join(t) {
    here[t.label] = [];
    joining[t.label] = [];
    leaving[t.label] = [];
    presenceWhispers[t.label] = [];
    const ch = t.echo
      .join(PRESENCE_NAME)
      .here((users) => here[t.label].push(users))
      .joining((user) => joining[t.label].push(user))
      .leaving((user) => leaving[t.label].push(user))
      .listenForWhisper('typing', (data) => presenceWhispers[t.label].push(data));
    check(ch.name === PRESENCE, `Echo .join() named the channel ${ch.name}, expected ${PRESENCE}`);
    record(t, ch.subscription);
    // The raw binding, to see the user_id pusher-js takes from the client event.
    ch.subscription.bind('client-typing', (data, meta) => presenceWhispers[t.label].push({ meta }));
    presence[t.label] = ch;
    return subscribed(t, ch, PRESENCE);
  }
  const membersOf = (t) => ({ ...presence[t.label].subscription.members.members });
  const info = (u) => ({ name: u.name });

  run.step = 'b: user 1 joins the presence channel';
  await join(e1);
  check(here[e1.label].length === 1, `Echo user 1: here() fired ${here[e1.label].length} times`);
  expectEqual(here[e1.label][0], [info(ANN)], 'Echo user 1: here() on joining an empty presence channel');
  expectEqual(membersOf(e1), { [ANN.id]: info(ANN) }, 'Echo user 1: pusher-js members after subscribing');

  run.step = 'b: user 2 joins the presence channel';
  await join(e2);
  check(here[e2.label].length === 1, `Echo user 2: here() fired ${here[e2.label].length} times`);
  expectEqual(
    [...here[e2.label][0]].sort((a, b) => a.name.localeCompare(b.name)),
    [info(ANN), info(BOB)],
    'Echo user 2: here() users',
  );
  expectEqual(membersOf(e2), { [ANN.id]: info(ANN), [BOB.id]: info(BOB) }, 'Echo user 2: pusher-js members (ids and info)');
  check(presence[e2.label].subscription.members.me?.id === BOB.id, `Echo user 2: members.me is ${show(presence[e2.label].subscription.members.me)}`);
  await until(() => joining[e1.label].length > 0, `Echo user 1: joining() for user 2`);

  run.step = "b: user 1's second tab joins the presence channel";
  const e3 = echoClient('Echo user 1 (tab 2)', ANN);
  await connect(e3);
  await join(e3);
  check(here[e3.label].length === 1, `Echo user 1 (tab 2): here() fired ${here[e3.label].length} times`);
  expectEqual(
    [...here[e3.label][0]].sort((a, b) => a.name.localeCompare(b.name)),
    [info(ANN), info(BOB)],
    'Echo user 1 (tab 2): here() users (user 1 once, although it has two connections)',
  );
  expectEqual(membersOf(e3), { [ANN.id]: info(ANN), [BOB.id]: info(BOB) }, 'Echo user 1 (tab 2): pusher-js members');
  check(presence[e3.label].subscription.members.count === 2, `Echo user 1 (tab 2): members.count is ${presence[e3.label].subscription.members.count}, expected 2`);
  await sleep(SETTLE_MS);
  check(joining[e1.label].length === 1, `Echo user 1: joining() fired ${joining[e1.label].length} times, expected once (for user 2 only, not for its own second tab): ${show(joining[e1.label])}`);
  expectEqual(joining[e1.label][0], info(BOB), 'Echo user 1: joining() user');
  check(joining[e2.label].length === 0, `Echo user 2: joining() fired for user 1's second tab: ${show(joining[e2.label])}`);
  expectEqual(membersOf(e1), { [ANN.id]: info(ANN), [BOB.id]: info(BOB) }, 'Echo user 1: pusher-js members after user 2 and the second tab joined');
  passed('b: presence here() lists users once with ids and info; joining() once per user, not per tab');

  // ---- c. whisper on the presence channel ----------------------------------------------------
  run.step = 'c: whisper on the presence channel';
  presence[e2.label].whisper('typing', TYPING_PRESENCE);
  const heardBy = (t) => presenceWhispers[t.label].filter((w) => !w.meta);
  const metaOf = (t) => presenceWhispers[t.label].filter((w) => w.meta).map((w) => w.meta);
  await until(() => heardBy(e1).length > 0 && heardBy(e3).length > 0, `both tabs of user 1 to hear user 2's whisper on ${PRESENCE}`);
  await sleep(SETTLE_MS);
  for (const t of [e1, e3]) {
    check(heardBy(t).length === 1, `${t.label}: heard the presence whisper ${heardBy(t).length} times`);
    expectEqual(heardBy(t)[0], TYPING_PRESENCE, `${t.label}: presence whisper data`);
    expectEqual(metaOf(t), [{ user_id: BOB.id }], `${t.label}: metadata pusher-js passes with the presence whisper (user_id of the sender)`);
  }
  check(presenceWhispers[e2.label].length === 0, `Echo user 2 (the sender) heard its own whisper: ${show(presenceWhispers[e2.label])}`);
  passed('c: whisper on a presence channel reaches the others once with user_id, not the sender');

  // ---- g. SDK reads --------------------------------------------------------------------------
  run.step = 'g: GET /channels?filter_by_prefix=presence-&info=user_count';
  const channels = await expectResponse(
    sdk.get({ path: '/channels', params: { filter_by_prefix: 'presence-', info: 'user_count' } }),
    'GET /channels filter_by_prefix=presence- info=user_count',
  );
  expectEqual(channels, { channels: { [PRESENCE]: { user_count: 2 } } }, 'GET /channels?filter_by_prefix=presence-&info=user_count');
  summary.channels_response = channels;

  run.step = 'g: GET /channels/<presence>?info=user_count';
  const one = await expectResponse(
    sdk.get({ path: `/channels/${PRESENCE}`, params: { info: 'user_count' } }),
    `GET /channels/${PRESENCE} info=user_count`,
  );
  check(one.occupied === true && one.user_count === 2, `GET /channels/${PRESENCE}?info=user_count: expected occupied true and user_count 2, got ${show(one)}`);

  run.step = 'g: GET /channels/<presence>/users';
  const users = await expectResponse(sdk.get({ path: `/channels/${PRESENCE}/users` }), `GET /channels/${PRESENCE}/users`);
  check(Array.isArray(users?.users), `GET /channels/${PRESENCE}/users: no "users" array in ${show(users)}`);
  expectEqual([...users.users].sort(byId), [{ id: ANN.id }, { id: BOB.id }], `GET /channels/${PRESENCE}/users`);
  passed('g: SDK reads: /channels user_count, /channels/<presence>, /channels/<presence>/users');

  // ---- b. leaving ----------------------------------------------------------------------------
  run.step = "b: user 1's second tab leaves";
  e3.echo.disconnect();
  await until(() => e3.client.connection.state === 'disconnected', 'Echo user 1 (tab 2) to disconnect');
  await sleep(SETTLE_MS);
  check(leaving[e1.label].length === 0 && leaving[e2.label].length === 0, `leaving() fired when user 1 closed only its second tab: user 1 saw ${show(leaving[e1.label])}, user 2 saw ${show(leaving[e2.label])}`);
  const stillTwo = await expectResponse(sdk.get({ path: `/channels/${PRESENCE}/users` }), `GET /channels/${PRESENCE}/users after the second tab left`);
  expectEqual([...(stillTwo.users ?? [])].sort(byId), [{ id: ANN.id }, { id: BOB.id }], `GET /channels/${PRESENCE}/users after user 1's second tab left`);

  run.step = 'b: user 2 leaves';
  e2.echo.disconnect();
  await until(() => leaving[e1.label].length > 0, 'Echo user 1: leaving() for user 2');
  await sleep(SETTLE_MS);
  check(leaving[e1.label].length === 1, `Echo user 1: leaving() fired ${leaving[e1.label].length} times: ${show(leaving[e1.label])}`);
  expectEqual(leaving[e1.label][0], info(BOB), 'Echo user 1: leaving() user');
  expectEqual(membersOf(e1), { [ANN.id]: info(ANN) }, 'Echo user 1: pusher-js members after user 2 left');
  const onlyAnn = await expectResponse(sdk.get({ path: `/channels/${PRESENCE}/users` }), `GET /channels/${PRESENCE}/users after user 2 left`);
  expectEqual(onlyAnn.users, [{ id: ANN.id }], `GET /channels/${PRESENCE}/users after user 2 left`);
  passed('b: closing a second tab fires no leaving(); the last connection of a user fires it once');

  // ---- d. signin, sendToUser, terminateUserConnections ----------------------------------------
  run.step = 'd: pusher-js signin';
  const signins = [];
  const s = tracked(
    'signed-in client',
    new PusherJs(
      key,
      pusherJsOptions({
        userAuthentication: {
          customHandler: ({ socketId }, callback) => {
            try {
              const signed = sdk.authenticateUser(socketId, SIGNED_IN);
              signins.push(signed);
              callback(null, signed);
            } catch (e) {
              callback(e, null);
            }
          },
        },
      }),
    ),
  );
  const signinErrors = [];
  s.client.user.bind('pusher:signin_error', (e) => signinErrors.push(e));
  const alerts = [];
  s.client.user.bind('score.alert', (data) => alerts.push(data));
  await connect(s);
  s.client.signin();
  await until(
    () => signinErrors.length > 0 || s.client.user.serverToUserChannel?.subscribed === true,
    `signin_success and the #server-to-user-${SIGNED_IN.id} subscription`,
  );
  check(signinErrors.length === 0, `signin failed: ${show(signinErrors)}`);
  expectEqual(s.client.user.user_data, SIGNED_IN, 'pusher.user.user_data after signin_success');
  check(signins.length === 1, `the user authenticator ran ${signins.length} times`);

  run.step = 'd: SDK sendToUser';
  await expectResponse(sdk.sendToUser(SIGNED_IN.id, 'score.alert', SCORE_ALERT), `sendToUser ${SIGNED_IN.id}`);
  await until(() => alerts.length > 0, 'score.alert at pusher.user');
  await sleep(SETTLE_MS);
  check(alerts.length === 1, `pusher.user got score.alert ${alerts.length} times`);
  expectEqual(alerts[0], SCORE_ALERT, 'pusher.user score.alert data');
  expectClean(s);
  passed('d: signin, sendToUser reaches pusher.user once, deep-equal');

  run.step = 'd: SDK terminateUserConnections';
  run.allowWarnings = true; // pusher-js logs the pusher:error and the close it is about to get
  s.errorsExpected = true;
  await expectResponse(sdk.terminateUserConnections(SIGNED_IN.id), `terminateUserConnections ${SIGNED_IN.id}`);
  await until(() => s.client.connection.state !== 'connected', 'the signed-in client to lose its connection');
  await sleep(SETTLE_MS);
  run.allowWarnings = false;
  summary.terminated = { states: s.states, errors: s.errors };
  check(s.client.connection.state !== 'connected', `the terminated client reconnected: ${s.states.join(' -> ')}`);
  // Pusher and Reverb say why before closing: pusher:error 4009, then close code 4009, which
  // pusher-js treats as 'refused' and so does not reconnect.
  const codes = s.errors.map((e) => e.detail?.data?.code ?? e.detail?.code).filter((c) => c !== undefined);
  check(codes.includes(4009), `the terminated client saw no error code 4009 (pusher:error / close code); errors: ${show(s.errors)}`);
  check(s.client.connection.state === 'disconnected', `the terminated client ended in state ${s.client.connection.state}, expected disconnected (close code 4009 = refused): ${s.states.join(' -> ')}`);
  check(e1.client.connection.state === 'connected', `Echo user 1 lost its connection when user ${SIGNED_IN.id} was terminated: ${e1.states.join(' -> ')}`);
  passed('d: terminateUserConnections closes the signed-in client (4009), no reconnect, others stay');

  // ---- e. private-encrypted channel ----------------------------------------------------------
  run.step = 'e: pusher-js subscribes to the encrypted channel';
  const authorized = [];
  const enc = tracked(
    'encrypted client',
    new PusherJs(
      key,
      pusherJsOptions({
        channelAuthorization: {
          customHandler: ({ socketId, channelName }, callback) => {
            try {
              const auth = encSdk.authorizeChannel(socketId, channelName);
              authorized.push({ channelName, has_shared_secret: typeof auth.shared_secret === 'string' });
              callback(null, auth);
            } catch (e) {
              callback(e, null);
            }
          },
        },
      }),
    ),
  );
  await connect(enc);
  const encCh = enc.client.subscribe(ENCRYPTED);
  record(enc, encCh);
  await subscribed(enc, encCh, ENCRYPTED, true);
  expectEqual(authorized, [{ channelName: ENCRYPTED, has_shared_secret: true }], 'channel authorizer calls (shared_secret from the SDK)');

  run.step = 'e: SDK trigger (encrypted) on the encrypted channel';
  await expectResponse(encSdk.trigger(ENCRYPTED, 'odds.update', ODDS), `encrypted trigger to ${ENCRYPTED}`);
  await until(() => got(enc, ENCRYPTED, 'odds.update').length > 0, `odds.update decrypted at the encrypted client`);
  await sleep(SETTLE_MS);
  expectOnce(enc, ENCRYPTED, 'odds.update', ODDS);
  check(enc.received.length === 1, `encrypted client: unexpected events: ${show(enc.received)}`);
  check(!run.pusherLog.some((l) => /decrypt|Unexpected format for encrypted event|ciphertext length|nonce length/i.test(l)), 'pusher-js could not decrypt an event (see the log below)');
  expectClean(enc);
  passed('e: private-encrypted channel: SDK-encrypted event decrypted by pusher-js, deep-equal');

  // ---- f. cache channels ---------------------------------------------------------------------
  run.step = 'f: subscribe to the cache channel after the event';
  // Three clients, so that (with 2 shards) at least one is likely on a shard other than the one
  // that answered the HTTP trigger.
  const cacheClients = [1, 2, 3].map((i) => tracked(`cache client ${i}`, new PusherJs(key, pusherJsOptions())));
  const seq = new Map(); // label -> channel -> [event names in order, with data]
  for (const t of cacheClients) await connect(t);
  async function subscribeSeq(t, name) {
    const ch = t.client.subscribe(name);
    const list = [];
    seq.set(`${t.label} ${name}`, list);
    ch.bind_global((event, data) => list.push({ event, data }));
    record(t, ch);
    await subscribed(t, ch, name, true);
    return list;
  }
  const hits = await Promise.all(cacheClients.map((t) => subscribeSeq(t, CACHE)));
  await until(() => hits.every((l) => l.length >= 2), `match.update from the cache at every cache client`);
  await sleep(SETTLE_MS);
  cacheClients.forEach((t, i) => {
    expectEqual(hits[i].map((e) => e.event), ['pusher:subscription_succeeded', 'match.update'], `${t.label}: events on ${CACHE} (cached event right after subscription_succeeded)`);
    expectEqual(hits[i][1].data, CACHED_UPDATE, `${t.label}: cached match.update data`);
  });
  passed('f: cache channel: the event triggered before subscribing arrives right after subscription_succeeded');

  run.step = 'f: subscribe to an empty cache channel';
  const miss = await subscribeSeq(cacheClients[0], CACHE_EMPTY);
  await until(() => miss.length >= 2, `pusher:cache_miss on ${CACHE_EMPTY}`);
  await sleep(SETTLE_MS);
  expectEqual(miss.map((e) => e.event), ['pusher:subscription_succeeded', 'pusher:cache_miss'], `${cacheClients[0].label}: events on ${CACHE_EMPTY}`);
  passed('f: empty cache channel: pusher:cache_miss after subscription_succeeded');

  // ---- nothing unexpected, then a clean goodbye ----------------------------------------------
  run.step = 'verify';
  const expectedTotals = new Map([
    [e1, 1 + 1], // match.event, presence whisper (its own private whisper never echoed)
    [e2, 1 + 1], // match.event, private whisper
    [e3, 1], // presence whisper
    [s, 0], // user events go to pusher.user, not a recorded channel
    [enc, 1],
    [cacheClients[0], 1],
    [cacheClients[1], 1],
    [cacheClients[2], 1],
  ]);
  for (const [t, n] of expectedTotals) {
    check(t.received.length === n, `${t.label}: expected ${n} events in all, got ${t.received.length}: ${show(t.received.map((r) => `${r.channel} ${r.event}`))}`);
    if (t !== s) expectClean(t);
  }
  run.checkNoWarnings();

  run.step = 'disconnect';
  const open = [e1, enc, ...cacheClients];
  e1.echo.disconnect();
  for (const t of [enc, ...cacheClients]) t.client.disconnect();
  await until(() => open.every((t) => t.client.connection.state === 'disconnected'), 'all clients to disconnect');
  for (const t of open) {
    expectClean(t);
    check(!t.states.includes('unavailable') && !t.states.includes('failed'), `${t.label}: unexpected connection states ${t.states.join(' -> ')}`);
    check(t.states.filter((x) => x === 'connected').length === 1, `${t.label}: reconnected during the run: ${t.states.join(' -> ')}`);
  }
  run.checkNoWarnings(' while disconnecting');

  summary.ok = true;
  return summary;
}

run.finish(main);
