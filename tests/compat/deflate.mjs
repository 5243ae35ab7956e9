// permessage-deflate with pusher-js on Node: pusher-js's Node build opens its socket with a
// bundled faye-websocket client that offers no extension, so this script hands pusher-js the `ws`
// package's WebSocket instead (`Pusher.Runtime.createWebSocket`), which offers
// `permessage-deflate; client_max_window_bits` as browsers do. Everything else is pusher-js.
//
// Checks: the extension ws negotiated is the server's answer (no context takeover either way);
// on the wire (a tap on the TCP socket, walking the unmasked server frames) a large event arrives
// with RSV1 set and a short one without; pusher-js decodes both to the exact data; a client that
// offered nothing (pusher-js's own faye socket) gets the same events with RSV1 never set; and ws
// compressing a large client event on its way in (RSV1 from the client) is inflated by the server
// and reaches the other client intact.
//
// Usage: node deflate.mjs host port appId key secret. Run by tests/compat_pusher_js.rs.

import { createHmac } from 'node:crypto';
import net from 'node:net';
import PusherJs from 'pusher-js';
import PusherServer from 'pusher';
import WebSocket from 'ws';
import { Clients, Run, check, expectEqual, expectResponse, installedVersion, MATCH_UPDATE, serverFromArgs } from './harness.mjs';

const { host, port, appId, key, secret } = serverFromArgs('deflate.mjs');
// Shared context (the server's default): ws keeps its window across server messages, so the
// server may send a message compressed against the channel's previous one (a delta frame).
const ANSWER = 'permessage-deflate; client_no_context_takeover';
const CHANNEL = 'private-sports.football.matches.12345';

const run = new Run({ overallMs: 15_000, stepMs: 5_000, teardown: () => clients.teardown() });
const clients = new Clients(run, { host, port });
run.captureLogs(PusherJs, [/disableStats option is deprecated/]);

/// Every server frame's first byte, from a tap on the TCP stream from its first byte: the HTTP
/// answer's head, then frames (server frames are unmasked: a 2-, 4- or 10-byte header, then the
/// payload).
function tapFrames(socket) {
  const firsts = [];
  firsts.head = '';
  firsts.lens = [];
  let buf = Buffer.alloc(0);
  let inHead = true;
  socket.on('data', (chunk) => {
    buf = Buffer.concat([buf, chunk]);
    if (inHead) {
      const end = buf.indexOf('\r\n\r\n');
      if (end < 0) return;
      firsts.head = buf.subarray(0, end).toString('latin1');
      buf = buf.subarray(end + 4);
      inHead = false;
    }
    for (;;) {
      if (buf.length < 2) return;
      let len = buf[1] & 0x7f;
      let at = 2;
      if (len === 126) {
        if (buf.length < 4) return;
        len = buf.readUInt16BE(2);
        at = 4;
      } else if (len === 127) {
        if (buf.length < 10) return;
        len = Number(buf.readBigUInt64BE(2));
        at = 10;
      }
      if (buf.length < at + len) return;
      firsts.push(buf[0]);
      firsts.lens.push(len);
      buf = buf.subarray(at + len);
    }
  });
  return firsts;
}

// pusher-js's sockets, made by `ws` (the first socket made after `useWs = true`).
let useWs = false;
const wsSockets = [];
const fayeCreate = PusherJs.Runtime.createWebSocket.bind(PusherJs.Runtime);
PusherJs.Runtime.createWebSocket = (url) => {
  if (!useWs) return fayeCreate(url);
  const entry = { ws: null, firsts: null };
  entry.ws = new WebSocket(url, {
    perMessageDeflate: { threshold: 512 },
    // The TCP connection, tapped from its first byte.
    createConnection: (opts) => {
      const sock = net.connect(opts);
      entry.firsts = tapFrames(sock);
      return sock;
    },
  });
  wsSockets.push(entry);
  return entry.ws;
};

const authorizer = (channel) => ({
  authorize: (socketId, callback) => {
    const sig = createHmac('sha256', secret).update(`${socketId}:${channel.name}`).digest('hex');
    callback(null, { auth: `${key}:${sig}` });
  },
});

async function main() {
  const summary = { ok: false, versions: { 'pusher-js': installedVersion('pusher-js'), ws: installedVersion('ws') } };

  run.step = 'connect pusher-js over ws (offers permessage-deflate)';
  useWs = true;
  const z = clients.track('deflate client', new PusherJs(key, clients.pusherJsOptions({ authorizer })));
  await clients.connect(z);
  useWs = false;
  check(wsSockets.length === 1, `expected one ws socket, got ${wsSockets.length}`);
  const { ws } = wsSockets[0];
  summary.extensions = ws.extensions;
  // ws accepted the server's answer (it fails the connection on one it cannot take), and the
  // answer on the wire is no context takeover either way.
  expectEqual(ws.extensions, 'permessage-deflate', 'extension ws negotiated');
  const answer = wsSockets[0].firsts.head
    .split('\r\n')
    .find((l) => l.toLowerCase().startsWith('sec-websocket-extensions:'));
  summary.answer = answer;
  expectEqual(answer?.slice(answer.indexOf(':') + 1).trim(), ANSWER, 'Sec-WebSocket-Extensions answered');

  run.step = 'connect pusher-js over its own socket (offers nothing)';
  const p = clients.track('plain client', new PusherJs(key, clients.pusherJsOptions({ authorizer })));
  await clients.connect(p);

  run.step = 'subscribe both';
  await clients.subscribe(z, CHANNEL);
  await clients.subscribe(p, CHANNEL);

  run.step = 'trigger a large and a short event';
  const sdk = new PusherServer({ appId, key, secret, host, port: String(port), useTLS: false });
  const before = wsSockets[0].firsts.length;
  await expectResponse(sdk.trigger(CHANNEL, 'match.update', MATCH_UPDATE), 'trigger match.update');
  await expectResponse(sdk.trigger(CHANNEL, 'tick', { n: 1 }), 'trigger tick');
  for (const t of [z, p]) {
    await run.until(() => clients.got(t, CHANNEL, 'tick').length === 1, `${t.label}: tick`);
    clients.expectOnce(t, CHANNEL, 'match.update', MATCH_UPDATE);
    clients.expectOnce(t, CHANNEL, 'tick', { n: 1 });
  }
  const firsts = wsSockets[0].firsts.slice(before, before + 2);
  summary.wire_first_bytes = firsts.map((b) => `0x${b.toString(16)}`);
  expectEqual(firsts, [0xc1, 0x81], 'first bytes of the two frames (RSV1 on the large one only)');

  run.step = 'a stream of similar updates: delta frames, decoded exactly';
  const updates = [];
  for (let i = 0; i < 20; i++) {
    updates.push({ ...MATCH_UPDATE, seq: i, home_team: { ...MATCH_UPDATE.home_team, score: i % 4 }, time: `${60 + i}:00` });
  }
  const from = wsSockets[0].firsts.length;
  for (const u of updates) {
    await expectResponse(sdk.trigger(CHANNEL, 'match.stream', u), 'trigger match.stream');
  }
  for (const t of [z, p]) {
    await run.until(() => clients.got(t, CHANNEL, 'match.stream').length === updates.length, `${t.label}: ${updates.length} updates`);
    expectEqual(clients.got(t, CHANNEL, 'match.stream').map((r) => r.data), updates, `${t.label}: every update, exact and in order`);
  }
  const lens = wsSockets[0].firsts.lens.slice(from, from + updates.length);
  const rsv1 = wsSockets[0].firsts.slice(from, from + updates.length);
  summary.stream_wire_lengths = lens;
  check(rsv1.every((b) => b === 0xc1), `every update compressed: ${rsv1}`);
  // The match.update above went compressed on its own (the channel's first compressed
  // message); these go against their predecessor: much smaller.
  const independent = wsSockets[0].firsts.lens[before];
  const median = [...lens].sort((a, b) => a - b)[Math.floor(lens.length / 2)];
  summary.independent_wire_length = independent;
  check(median * 2 < independent, `delta frames used: ${independent} bytes on its own, median ${median} in the stream`);

  run.step = 'a large client event, compressed by ws (RSV1 from the client)';
  const big = { note: 'x'.repeat(2000), match_id: 12345 };
  const chz = z.client.channel(CHANNEL);
  check(chz.trigger('client-note', big), 'pusher-js refused to send the client event');
  await run.until(() => clients.got(p, CHANNEL, 'client-note').length === 1, 'plain client: client-note');
  clients.expectOnce(p, CHANNEL, 'client-note', big);

  run.checkNoWarnings();
  for (const t of [z, p]) check(t.errors.length === 0, `${t.label}: errors ${JSON.stringify(t.errors)}`);
  summary.ok = true;
  return summary;
}

run.finish(main);
