// Browser check of the debug console: headless Chromium (Debian's `chromium` package, driven by
// playwright-core) opens the console of a running `bts-guru demo`, and the page must show live data:
// the stats poll counts the page's own WebSocket, events per second move, the scoreboard fills
// and then changes, and the live tail fills with events from the channels its pattern names.
// Then the tail is pointed at one channel, and what arrives must come from it.
//
// Usage: node console.mjs <console URL with ?token=> <screenshot.png>
//   SCREENSHOT_AFTER_MS (default 5000): how long to let traffic flow before the screenshot
//   (docs/console.png was taken after 30000, so the events/s line has some history).
// Prints one JSON summary line on stdout and exits 0 when every check passes; otherwise prints
// `console: FAIL: <why>` on stderr and exits 1. Run by tests/console_browser.rs.

import { existsSync } from 'node:fs';
import { chromium } from 'playwright-core';

const [url, screenshot] = process.argv.slice(2);
if (!url || !screenshot) {
  process.stderr.write('usage: node console.mjs <console url> <screenshot.png>\n');
  process.exit(2);
}
const executablePath = process.env.CHROMIUM ?? '/usr/bin/chromium';
// "A few seconds": how long each piece of live data may take to show up.
const LIVE_MS = 10_000;

class Failure extends Error {}
// Inside the try below: throws, so the browser is closed before we exit.
function fail(why) {
  throw new Failure(why);
}

if (!existsSync(executablePath)) {
  process.stderr.write(`console: FAIL: no Chromium at ${executablePath}: apt-get install chromium (tests/run.sh installs it), or set CHROMIUM\n`);
  process.exit(1);
}

const browser = await chromium.launch({
  executablePath,
  headless: true,
  // We run as root in CI containers: Chromium's sandbox needs user namespaces we may not have.
  args: ['--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu'],
});
const pageErrors = [];
let step = 'loading the page';
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  page.on('pageerror', (e) => pageErrors.push(String(e)));
  page.on('console', (m) => { if (m.type() === 'error') pageErrors.push(`${m.text()} (${m.location().url})`); });
  // What the page's WebSockets negotiated, from Chromium's own network log (DevTools protocol):
  // the Sec-WebSocket-Extensions the server answered, and how many data frames arrived (which
  // Chromium reports already inflated; the page decoding them is the proof they inflate).
  const cdp = await page.context().newCDPSession(page);
  await cdp.send('Network.enable');
  const wsExtensions = [];
  let wsFrames = 0;
  cdp.on('Network.webSocketHandshakeResponseReceived', ({ response }) => {
    const h = Object.entries(response.headers ?? {}).find(([k]) => k.toLowerCase() === 'sec-websocket-extensions');
    wsExtensions.push(h ? h[1] : null);
  });
  cdp.on('Network.webSocketFrameReceived', ({ response }) => {
    if (response.opcode === 1) wsFrames += 1;
  });

  const resp = await page.goto(url, { waitUntil: 'load' });
  if (!resp || resp.status() !== 200) fail(`GET ${url} answered ${resp && resp.status()}`);

  const live = async (what, fn, arg) => {
    step = what;
    try {
      await page.waitForFunction(fn, arg, { timeout: LIVE_MS, polling: 100 });
    } catch {
      const state = await page.evaluate(() => ({
        ws: document.getElementById('ws-state').textContent,
        stats: document.getElementById('poll-state').textContent,
        error: document.getElementById('error').textContent,
        scoreboard: document.querySelectorAll('#scoreboard tbody tr').length,
        tail: document.querySelectorAll('#tail li').length,
      }));
      fail(`no live data within ${LIVE_MS} ms: ${what} (page: ${JSON.stringify(state)}; errors: ${JSON.stringify(pageErrors)})`);
    }
  };

  await live('the WebSocket connects', () => document.getElementById('ws-state').textContent === 'websocket: connected');
  await live('the stats count the page\'s own connection',
    () => Number(document.getElementById('conn-total').textContent.replace(/,/g, '')) >= 1);
  await live('the scoreboard fills', () => document.querySelectorAll('#scoreboard tbody tr').length > 0);
  const before = await page.textContent('#scoreboard tbody');
  await live('the scoreboard changes', (t) => document.querySelector('#scoreboard tbody').textContent !== t, before);
  await live('the live tail fills', () => document.querySelectorAll('#tail li').length >= 5);
  await live('events per second move', () => parseFloat(document.getElementById('eps').textContent) > 0);
  await live('the channel list shows the scoreboard\'s channels',
    () => [...document.querySelectorAll('#channels td')].some((td) => td.textContent === 'sports.football'));
  await live('latency percentiles show', () => document.querySelector('#latency td').textContent !== '–');

  const tailChannels = await page.$$eval('#tail li .ch', (els) => els.map((e) => e.textContent));
  const pattern = /^sports\.[^.]+\.leagues\.[^.]+\.matches\.\d+$/;
  const stray = tailChannels.filter((c) => !pattern.test(c));
  if (stray.length) fail(`the default tail (sports.*.leagues.*.matches.*) showed other channels: ${stray}`);
  const scoreboardRows = await page.$$eval('#scoreboard tbody tr', (rows) => rows.length);

  // A few more seconds of traffic so the picture has a sparkline, then the screenshot.
  step = 'taking the screenshot';
  await page.waitForTimeout(Number(process.env.SCREENSHOT_AFTER_MS ?? 5000));
  await page.screenshot({ path: screenshot });

  // Follow one channel: what arrives next must be from it.
  step = 'following one channel';
  await page.fill('#tail-pattern', 'sports.basketball');
  await page.click('#tail-form button');
  await live('the tail follows sports.basketball', () => {
    const first = document.querySelector('#tail li .ch');
    return document.getElementById('tail-info').textContent.startsWith('1 channel') &&
      first !== null && first.textContent === 'sports.basketball';
  });
  const followed = await page.$$eval('#tail li .ch', (els) => {
    const out = [];
    for (const e of els) {
      if (e.textContent !== 'sports.basketball') break;
      out.push(e.textContent);
    }
    return out.length;
  });

  if (pageErrors.length) fail(`errors on the page: ${JSON.stringify(pageErrors)}`);
  console.log(JSON.stringify({
    ok: true,
    scoreboard_rows: scoreboardRows,
    tail_rows: tailChannels.length,
    followed_rows: followed,
    ws_extensions: wsExtensions,
    ws_text_frames: wsFrames,
    screenshot,
  }));
} catch (e) {
  const why = e instanceof Failure ? e.message : `${step}: ${e && e.stack ? e.stack : e}`;
  process.stderr.write(`console: FAIL: ${why}\n`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
