// Chunked request bodies from Node's own HTTP client: `http.request` without a Content-Length,
// the body written in pieces, makes Node send `Transfer-Encoding: chunked` (as many HTTP client
// libraries do for streamed bodies). Signs like the Pusher SDKs.
//
// Usage: node http_chunked.mjs host port appId key secret
// Publishes one event and a batch of two to `sports.football` (the Rust test checks they arrive),
// and one publish with a wrong secret (401). Prints one JSON summary line; exits 1 on failure.
//
// Run by tests/http_bodies.rs.

import http from 'node:http';
import { createHash, createHmac } from 'node:crypto';

const [host, portArg, appId, key, secret] = process.argv.slice(2);
const port = Number(portArg);
if (!host || !Number.isInteger(port) || !appId || !key || !secret) {
  process.stderr.write('usage: node http_chunked.mjs host port appId key secret\n');
  process.exit(2);
}
const fail = (why) => {
  process.stderr.write(`http_chunked: FAIL: ${why}\n`);
  process.exit(1);
};
setTimeout(() => fail('gave up after 15 s'), 15_000).unref();

// Pusher HTTP API signing: HMAC-SHA256 of "METHOD\npath\nsorted query", body_md5 included.
function signedPath(path, body, signingSecret) {
  const params = {
    auth_key: key,
    auth_timestamp: String(Math.floor(Date.now() / 1000)),
    auth_version: '1.0',
    body_md5: createHash('md5').update(body).digest('hex'),
  };
  const query = Object.keys(params).sort().map((k) => `${k}=${params[k]}`).join('&');
  const sig = createHmac('sha256', signingSecret).update(`POST\n${path}\n${query}`).digest('hex');
  return `${path}?${query}&auth_signature=${sig}`;
}

// POSTs `body` in three writes with no Content-Length: Node frames it as chunked.
function post(endpoint, body, signingSecret = secret) {
  return new Promise((resolve, reject) => {
    const req = http.request(
      { host, port, method: 'POST', path: signedPath(`/apps/${appId}/${endpoint}`, body, signingSecret),
        headers: { 'Content-Type': 'application/json' } },
      (res) => {
        let text = '';
        res.setEncoding('utf8');
        res.on('data', (d) => { text += d; });
        res.on('end', () => resolve({ status: res.statusCode, text, head: req._header }));
      },
    );
    req.on('error', reject);
    const third = Math.ceil(body.length / 3);
    req.write(body.slice(0, third));
    req.write(body.slice(third, 2 * third));
    req.end(body.slice(2 * third));
  });
}

const one = JSON.stringify({ name: 'match.update', channel: 'sports.football', data: 'node chunked' });
const batch = JSON.stringify({ batch: [
  { name: 'match.update', channel: 'sports.football', data: 'node batch 1' },
  { name: 'match.update', channel: 'sports.football', data: 'node batch 2' },
] });

const published = await post('events', one);
if (!/transfer-encoding: chunked/i.test(published.head) || /content-length/i.test(published.head)) {
  fail(`Node did not send a chunked body: ${published.head}`);
}
if (published.status !== 200) fail(`publish: ${published.status} ${published.text}`);
const batched = await post('batch_events', batch);
if (batched.status !== 200) fail(`batch: ${batched.status} ${batched.text}`);
const forged = await post('events', JSON.stringify({ name: 'x', channel: 'sports.football', data: 'forged' }), 'wrong-secret');
if (forged.status !== 401) fail(`bad signature: ${forged.status} ${forged.text}`);

console.log(JSON.stringify({ ok: true, publish: published.status, batch: batched.status, bad_signature: forged.status }));
