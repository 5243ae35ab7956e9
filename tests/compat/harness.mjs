// What every compat script shares: where the server is (arguments or REVERB_* variables), what
// pusher-js logs (kept for the failure report; a warning fails the run unless ignored), and how a
// run ends: one JSON summary line on stdout and exit 0, or one `compat: FAIL: ...` line on stderr,
// the clients torn down, and exit 1; and the waits a step may make, each bounded.

import { readFileSync } from 'node:fs';
import net from 'node:net';
import { inspect, isDeepStrictEqual } from 'node:util';

/// A live match's state, the event payload the scripts publish as `match.update` (nested objects,
/// numbers and strings, as a sports feed sends it).
export const MATCH_UPDATE = {
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

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export const show = (v) => inspect(v, { depth: 6, breakLength: Infinity });

export function check(cond, msg) {
  if (!cond) throw new Error(msg);
}

/// A package's installed version, read straight from node_modules (laravel-echo's `exports` map
/// does not expose its package.json).
export const installedVersion = (pkg) =>
  JSON.parse(readFileSync(new URL(`./node_modules/${pkg}/package.json`, import.meta.url), 'utf8')).version;

/// The server and app to test: `node <script> host port appId key secret`, or REVERB_HOST,
/// REVERB_PORT, REVERB_APP_ID, REVERB_APP_KEY, REVERB_APP_SECRET. Exits 2 with a usage line when
/// something is missing.
export function serverFromArgs(script) {
  const argv = process.argv.slice(2);
  const env = process.env;
  const s = {
    host: argv[0] ?? env.REVERB_HOST ?? '127.0.0.1',
    port: Number(argv[1] ?? env.REVERB_PORT ?? 8080),
    appId: argv[2] ?? env.REVERB_APP_ID,
    key: argv[3] ?? env.REVERB_APP_KEY,
    secret: argv[4] ?? env.REVERB_APP_SECRET,
  };
  if (!s.appId || !s.key || !s.secret || !Number.isInteger(s.port) || s.port <= 0) {
    process.stderr.write(
      `usage: node ${script} host port appId key secret (or REVERB_HOST, REVERB_PORT, REVERB_APP_ID, REVERB_APP_KEY, REVERB_APP_SECRET)\n`,
    );
    process.exit(2);
  }
  return s;
}

/// Rejects with "timed out after `ms` ms waiting for `what`" unless `promise` settles first.
export function withTimeout(promise, what, ms) {
  let t;
  return Promise.race([
    promise,
    new Promise((_, reject) => {
      t = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
    }),
  ]).finally(() => clearTimeout(t));
}

/// One run of a script: its current `step` (named in every failure), the pusher-js log, and the
/// overall deadline.
export class Run {
  /// `overallMs`: the whole run's deadline; `stepMs`: the default for each wait; `logTail`: how
  /// many pusher-js log lines a failure prints; `teardown`: disconnects the script's clients.
  constructor({ overallMs, stepMs, logTail = 40, teardown = () => {} }) {
    this.step = 'start';
    this.stepMs = stepMs;
    this.logTail = logTail;
    this.teardown = teardown;
    this.finished = false;
    this.pusherLog = [];
    this.pusherWarnings = [];
    /// While set, what pusher-js warns is logged but does not fail the run.
    this.allowWarnings = false;
    this.overall = setTimeout(
      () => this.fail(`overall timeout: not done after ${overallMs / 1000} s (last step: ${this.step})`),
      overallMs,
    );
    process.on('unhandledRejection', (e) => this.fail(`unhandled rejection in step "${this.step}": ${e?.stack ?? e}`));
    process.on('uncaughtException', (e) => this.fail(`uncaught exception in step "${this.step}": ${e?.stack ?? e}`));
  }

  /// Routes pusher-js's logging here (it logs through console.* only when logToConsole is set;
  /// the scripts write to process.stdout / process.stderr directly). A warning or error fails
  /// the run (see `pusherWarnings`) unless it matches one of `ignored`.
  captureLogs(PusherJs, ignored = []) {
    PusherJs.logToConsole = true;
    console.log = (...args) => this.pusherLog.push(args.map(String).join(' '));
    console.info = console.log;
    console.debug = console.log;
    console.warn = console.error = (...args) => {
      const line = args.map((a) => (typeof a === 'string' ? a : inspect(a, { depth: 4 }))).join(' ');
      this.pusherLog.push(`WARN ${line}`);
      if (!this.allowWarnings && !ignored.some((re) => re.test(line))) {
        this.pusherWarnings.push(`${this.step}: ${line}`);
      }
    };
  }

  fail(msg) {
    if (this.finished) return;
    this.finished = true;
    process.stderr.write(`compat: FAIL: ${msg}\n`);
    if (this.pusherLog.length) {
      const tail = this.pusherLog.slice(-this.logTail).map((l) => `  ${l}`).join('\n');
      process.stderr.write(`compat: last pusher-js log lines:\n${tail}\n`);
    }
    try {
      this.teardown();
    } catch {}
    // Give the close frames a moment to go out, then leave regardless.
    setTimeout(() => process.exit(1), 200).unref();
    process.exitCode = 1;
  }

  withTimeout(promise, what, ms = this.stepMs) {
    return withTimeout(promise, what, ms);
  }

  /// Resolves once `pred()` holds, polling; rejects after `ms`, or as soon as `bail()` names a
  /// reason to stop waiting (a client's protocol error, say).
  async until(pred, what, ms = this.stepMs, bail = () => null) {
    const deadline = Date.now() + ms;
    while (!pred()) {
      const why = bail(what);
      if (why) throw new Error(why);
      if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
      await sleep(10);
    }
  }

  /// Fails the run if pusher-js warned (`when` says at what point).
  checkNoWarnings(when = '') {
    check(this.pusherWarnings.length === 0, `pusher-js logged warnings/errors${when}: ${show(this.pusherWarnings)}`);
  }

  /// Runs `main`, then prints its summary as one JSON line and exits 0; a failure is reported
  /// with the step it happened in.
  finish(main) {
    main().then(
      (summary) => {
        if (this.finished) return;
        this.finished = true;
        clearTimeout(this.overall);
        process.stdout.write(`${JSON.stringify(summary)}\n`);
        process.exit(0);
      },
      (err) => this.fail(`step "${this.step}": ${err?.message ?? err}`),
    );
  }
}

export function expectEqual(got, want, what) {
  check(isDeepStrictEqual(got, want), `${what}:\n  expected ${show(want)}\n  got      ${show(got)}`);
}

/// An error or event as plain data for a report (DOM-ish targets left out).
export function summarize(e) {
  try {
    return JSON.parse(JSON.stringify(e, (k, v) => (k === 'target' || k === 'currentTarget' ? undefined : v)));
  } catch {
    return inspect(e, { depth: 3 });
  }
}

/// The parsed JSON body of an official `pusher` SDK request that must answer 200.
export async function expectResponse(promise, what) {
  let res;
  try {
    res = await promise;
  } catch (e) {
    // The SDK rejects with a RequestError carrying status and body for non-2xx responses.
    throw new Error(`${what}: HTTP API request failed: status ${e?.status} body ${show(e?.body)} (${e?.message ?? e})`);
  }
  const body = await res.text();
  check(res.status === 200, `${what}: HTTP status ${res.status}, body ${body}`);
  try {
    return JSON.parse(body);
  } catch {
    throw new Error(`${what}: response body is not JSON: ${show(body)}`);
  }
}

/// The script's pusher-js clients, each tracked: what it receives on recorded channels, every
/// protocol-level problem, and its connection states. `teardown()` disconnects them all.
export class Clients {
  constructor(run, server) {
    this.run = run;
    this.server = server;
    this.all = [];
    this.tracked = [];
  }

  /// pusher-js options as Laravel Echo's 'reverb' broadcaster sets them.
  pusherJsOptions(extra = {}) {
    const { host, port } = this.server;
    return {
      wsHost: host,
      wsPort: port,
      wssPort: port,
      forceTLS: false,
      enabledTransports: ['ws'],
      cluster: 'mt1',
      disableStats: true,
      ...extra,
    };
  }

  /// Tracks a pusher-js client (`received`, `errors`, `states`) and remembers it for teardown.
  track(label, client) {
    const t = {
      label,
      client,
      received: [], // { channel, event, data } for every non-internal event on a recorded channel
      errors: [], // pusher:error events, connection errors, subscription errors
      states: [client.connection.state],
    };
    client.connection.bind('state_change', ({ current }) => t.states.push(current));
    client.connection.bind('error', (e) => t.errors.push({ kind: 'connection error', detail: summarize(e) }));
    client.bind('pusher:error', (e) => t.errors.push({ kind: 'pusher:error', detail: summarize(e) }));
    this.all.push(client);
    this.tracked.push(t);
    return t;
  }

  teardown() {
    for (const c of this.all) {
      try {
        c.disconnect();
      } catch {}
    }
  }

  /// Waits until `t` is connected; returns its socket id (checked to be "<digits>.<digits>").
  async connect(t) {
    if (t.client.connection.state !== 'connected') {
      await this.run.withTimeout(
        new Promise((resolve, reject) => {
          t.client.connection.bind('connected', resolve);
          t.client.connection.bind('failed', () => reject(new Error(`${t.label}: connection failed`)));
          t.client.connection.bind('unavailable', () => reject(new Error(`${t.label}: connection unavailable`)));
        }),
        `${t.label} to connect`,
      );
    }
    const sid = t.client.connection.socket_id;
    check(/^\d+\.\d+$/.test(sid ?? ''), `${t.label}: socket_id ${show(sid)} is not "<digits>.<digits>"`);
    return sid;
  }

  /// Records every non-internal event pusher-js delivers on `ch` into `t.received`.
  record(t, ch) {
    ch.bind_global((event, data) => {
      if (event.startsWith('pusher:') || event.startsWith('pusher_internal:')) return;
      t.received.push({ channel: ch.name, event, data });
    });
  }

  /// Resolves when an Echo channel (or a pusher-js channel, `raw`) reports
  /// subscription_succeeded; a subscription error is recorded and rejects.
  subscribed(t, ch, name, raw = false) {
    return this.run.withTimeout(
      new Promise((resolve, reject) => {
        const onError = (e) => {
          t.errors.push({ kind: 'subscription_error', channel: name, detail: summarize(e) });
          reject(new Error(`${t.label}: subscription to ${name} failed: ${show(e)}`));
        };
        if (raw) {
          if (ch.subscribed) return resolve();
          ch.bind('pusher:subscription_succeeded', resolve);
          ch.bind('pusher:subscription_error', onError);
        } else {
          if (ch.subscription.subscribed) return resolve();
          ch.subscribed(resolve);
          ch.error(onError);
        }
      }),
      `${t.label}: pusher:subscription_succeeded on ${name}`,
    );
  }

  /// pusher-js: subscribes `t` to `name`, records it, and waits for subscription_succeeded.
  async subscribe(t, name) {
    const ch = t.client.subscribe(name);
    this.record(t, ch);
    await this.subscribed(t, ch, name, true);
    return ch;
  }

  /// What `t` received of `event` on `channel`.
  got(t, channel, event) {
    return t.received.filter((r) => r.channel === channel && r.event === event);
  }

  /// `t` received `event` on `channel` exactly once, with `data`.
  expectOnce(t, channel, event, data) {
    const g = this.got(t, channel, event);
    check(g.length === 1, `${t.label}: expected "${event}" on ${channel} exactly once, got it ${g.length} times: ${show(g)}`);
    expectEqual(g[0].data, data, `${t.label}: "${event}" on ${channel} data`);
  }
}

/// A TCP proxy to the server: `cut()` drops every connection through it; while `paused`, new
/// connections are held (not yet linked to the server) until `unpause()`: the network is down,
/// and pusher-js's reconnect gets through as soon as it is back.
export function tcpProxy(host, port) {
  const conns = new Set();
  const held = [];
  const link = (down) => {
    p.accepted += 1;
    const up = net.connect(port, host);
    down.pipe(up);
    up.pipe(down);
    const pair = { down, up };
    conns.add(pair);
    const end = () => {
      conns.delete(pair);
      down.destroy();
      up.destroy();
    };
    down.on('error', end).on('close', end);
    up.on('error', end).on('close', end);
  };
  const p = {
    paused: false,
    accepted: 0,
    server: net.createServer((down) => {
      if (p.paused) {
        down.on('error', () => {});
        held.push(down);
      } else {
        link(down);
      }
    }),
    unpause() {
      p.paused = false;
      for (const down of held.splice(0)) {
        if (!down.destroyed) link(down);
      }
    },
    cut() {
      for (const { down, up } of [...conns]) {
        down.destroy();
        up.destroy();
      }
      conns.clear();
    },
    close() {
      p.cut();
      for (const down of held.splice(0)) down.destroy();
      p.server.close();
    },
  };
  return new Promise((resolve) => p.server.listen(0, '127.0.0.1', () => resolve(p)));
}
