// bts-guru debug console. Polls /console/api/stats once a second, and subscribes with pusher-js
// (served by the daemon itself) over the ordinary /app/{key} WebSocket: to the sports channels for
// the scoreboard, and to the channels a name or pattern picks for the live tail.
// Plain browser JavaScript: no build step, no dependencies beyond pusher-js.
(() => {
  'use strict';

  const $ = (id) => document.getElementById(id);
  const params = new URLSearchParams(location.search);
  const token = params.get('token') || '';
  const appId = params.get('app');
  const statsUrl = '/console/api/stats?' +
    new URLSearchParams(appId ? { token, app: appId } : { token });

  const POLL_MS = 1000;
  const TAIL_MAX = 200;            // rows kept in the tail
  const TAIL_SUBS_MAX = 100;       // channels one pattern may subscribe to
  const SPARK_POINTS = 60;         // seconds of events/s history
  const FINISHED_KEEP_MS = 60000;  // finished matches stay this long on the scoreboard
  const CHANNELS_SHOWN = 25;
  const LEAGUES = {
    'premier-league': 'Premier League', 'la-liga': 'La Liga', nba: 'NBA', euroleague: 'EuroLeague',
  };

  let pusher = null;
  let prev = null;                 // the previous stats sample, for rates
  const epsHistory = [];
  const known = new Set();         // channel names the tail may match
  const matches = new Map();       // match_id -> { d, flashUntil, finishedAt }
  const scoreboardChannels = new Set();
  let tailRe = null;
  const tailSubs = new Map();      // channel name -> { ch, fn }
  let scoreboardDirty = false;

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined) e.textContent = text;
    if (cls) e.className = cls;
    return e;
  }

  function setPill(id, text, state) {
    const p = $(id);
    p.textContent = text;
    p.dataset.state = state;
  }

  function showError(msg) {
    const e = $('error');
    e.textContent = msg;
    e.hidden = !msg;
  }

  const fmtInt = (n) => Number(n).toLocaleString('en-US');

  function fmtUs(us) {
    if (us >= 1e6) return (us / 1e6).toFixed(2) + ' s';
    if (us >= 1e4) return (us / 1e3).toFixed(0) + ' ms';
    if (us >= 1e3) return (us / 1e3).toFixed(1) + ' ms';
    return us + ' µs';
  }

  // ---- stats -----------------------------------------------------------------------------------

  async function poll() {
    try {
      const r = await fetch(statsUrl, { cache: 'no-store' });
      if (r.status === 401) {
        setPill('poll-state', 'stats: token refused', 'bad');
        showError('The token was refused: open the URL `bts-guru demo` printed, or add ?token=… to this page\'s address.');
        return;
      }
      if (!r.ok) throw new Error('HTTP ' + r.status);
      const s = await r.json();
      showError('');
      render(s);
      if (!pusher) connect(s);
      setPill('poll-state', 'stats: live', 'ok');
    } catch (e) {
      setPill('poll-state', 'stats: ' + e.message, 'bad');
    }
  }

  async function pollLoop() {
    await poll();
    setTimeout(pollLoop, POLL_MS);
  }

  function render(s) {
    $('app-id').textContent = 'app ' + s.app.id + ' · ' + s.shard_count + ' shard' + (s.shard_count === 1 ? '' : 's');
    $('conn-total').textContent = fmtInt(s.connections);
    const most = Math.max(1, ...s.shards.map((x) => x.connections));
    $('shards').replaceChildren(...s.shards.map((x) => {
      const row = el('div', undefined, 'shard');
      row.append(el('span', 'shard ' + x.shard));
      const bar = el('span', undefined, 'bar');
      const fill = el('span');
      fill.style.width = (100 * x.connections / most).toFixed(1) + '%';
      bar.append(fill);
      row.append(bar, el('span', fmtInt(x.connections), 'n'));
      return row;
    }));

    if (prev && s.time_ms > prev.time_ms) {
      const dt = (s.time_ms - prev.time_ms) / 1000;
      const eps = Math.max(0, s.events_in_total - prev.events_in_total) / dt;
      const fps = Math.max(0, s.frames_out - prev.frames_out) / dt;
      $('eps').textContent = eps.toFixed(1);
      $('fps').textContent = fmtInt(Math.round(fps));
      epsHistory.push(eps);
      if (epsHistory.length > SPARK_POINTS) epsHistory.shift();
      spark();
    }
    prev = s;
    $('events-total').textContent = fmtInt(s.events_in_total);

    const l = s.latency_us;
    const cells = $('latency').children;
    [l.p50, l.p90, l.p99, l.p999, l.max].forEach((v, i) => {
      cells[i].textContent = l.count ? fmtUs(v) : '–';
    });
    $('lat-count').textContent = fmtInt(l.count) + ' deliveries measured (event arrival to frames written), since start';

    const tbody = $('channels').tBodies[0];
    if (s.channels === null) {
      $('channel-count').textContent = '(a shard did not answer in time)';
      return;
    }
    $('channel-count').textContent = fmtInt(s.channel_count) + ' with subscribers';
    tbody.replaceChildren(...s.channels.slice(0, CHANNELS_SHOWN).map((c) => {
      const tr = el('tr');
      const name = el('td', c.name);
      name.title = 'follow in the live tail';
      name.className = 'link';
      name.addEventListener('click', () => { $('tail-pattern').value = c.name; setTail(c.name); });
      tr.append(name, el('td', fmtInt(c.subscriptions) + (c.users !== undefined ? ' (' + c.users + ' users)' : ''), 'r'));
      return tr;
    }));
    if (s.channels.length > CHANNELS_SHOWN) {
      const tr = el('tr');
      tr.append(el('td', '… and ' + (s.channels.length - CHANNELS_SHOWN) + ' more', 'muted'), el('td'));
      tbody.append(tr);
    }
    for (const c of s.channels) addKnown(c.name);
  }

  function spark() {
    const max = Math.max(1, ...epsHistory);
    const step = 120 / (SPARK_POINTS - 1);
    const offset = (SPARK_POINTS - epsHistory.length) * step;
    const pts = epsHistory.map((v, i) => (offset + i * step).toFixed(1) + ',' + (29 - 27 * v / max).toFixed(1));
    $('eps-spark').firstElementChild.setAttribute('points', pts.join(' '));
  }

  // ---- pusher-js ---------------------------------------------------------------------------------

  function connect(s) {
    const tls = location.protocol === 'https:';
    const port = Number(location.port) || (tls ? 443 : 80);
    pusher = new Pusher(s.app.key, {
      cluster: 'mt1', // required by pusher-js, unused with wsHost
      wsHost: location.hostname,
      wsPort: port,
      wssPort: port,
      forceTLS: tls,
      enabledTransports: ['ws', 'wss'],
      disableStats: true,
    });
    pusher.connection.bind('state_change', (st) =>
      setPill('ws-state', 'websocket: ' + st.current, st.current === 'connected' ? 'ok' : 'warn'));
    const wanted = params.get('scoreboard');
    const chans = wanted ? wanted.split(',').map((c) => c.trim()).filter(Boolean) : s.scoreboard;
    for (const name of chans) {
      scoreboardChannels.add(name);
      pusher.subscribe(name).bind('match.update', onUpdate);
      addKnown(name);
    }
    $('scoreboard-channels').textContent = chans.join(', ');
    setTail($('tail-pattern').value);
  }

  // ---- scoreboard --------------------------------------------------------------------------------

  function onUpdate(d) {
    if (!d || d.match_id === undefined || !d.home_team || !d.away_team) return;
    const old = matches.get(d.match_id);
    const scored = old && (old.d.home_team.score !== d.home_team.score ||
                           old.d.away_team.score !== d.away_team.score);
    matches.set(d.match_id, {
      d,
      flashUntil: scored ? Date.now() + 1500 : (old ? old.flashUntil : 0),
      finishedAt: d.status === 'finished' ? ((old && old.finishedAt) || Date.now()) : 0,
    });
    // The channels this match publishes to, so that a tail pattern can find them.
    const sport = 'sports.' + d.sport_id;
    const league = sport + '.leagues.' + d.league_id;
    for (const name of [sport, league, league + '.matches.' + d.match_id,
                        sport + '.teams.' + d.home_team.id, sport + '.teams.' + d.away_team.id]) {
      addKnown(name);
    }
    scoreboardDirty = true;
  }

  function renderScoreboard() {
    if (!scoreboardDirty && ![...matches.values()].some((m) => m.flashUntil || m.finishedAt)) return;
    scoreboardDirty = false;
    const now = Date.now();
    for (const [id, m] of matches) {
      if (m.finishedAt && now - m.finishedAt > FINISHED_KEEP_MS) matches.delete(id);
    }
    const rows = [...matches.values()].sort((a, b) =>
      a.d.sport_id.localeCompare(b.d.sport_id) || a.d.league_id.localeCompare(b.d.league_id) ||
      a.d.match_id - b.d.match_id);
    $('scoreboard').tBodies[0].replaceChildren(...rows.map((m) => {
      const d = m.d;
      const tr = el('tr');
      tr.dataset.match = d.match_id;
      if (m.flashUntil > now) tr.className = 'scored';
      else m.flashUntil = 0;
      tr.append(
        el('td', LEAGUES[d.league_id] || d.league_id, 'league'),
        el('td', d.home_team.name, 'r team'),
        el('td', d.home_team.score + ' – ' + d.away_team.score, 'c score'),
        el('td', d.away_team.name, 'team'),
        el('td', d.status, 'status ' + d.status),
        el('td', d.period),
        el('td', d.time, 'c clock'));
      return tr;
    }));
    $('scoreboard-empty').hidden = rows.length > 0;
  }

  // ---- live tail ---------------------------------------------------------------------------------

  function globRe(pattern) {
    const esc = (s) => s.replace(/[.+?^${}()|[\]\\]/g, '\\$&');
    return new RegExp('^' + pattern.split('*').map(esc).join('.*') + '$');
  }

  // Private, presence and user channels need an auth endpoint this page does not have.
  const tailable = (name) => !/^(private-|presence-|#)/.test(name);

  function setTail(pattern) {
    pattern = pattern.trim();
    for (const [name, sub] of tailSubs) {
      sub.ch.unbind_global(sub.fn);
      if (pusher && !scoreboardChannels.has(name)) pusher.unsubscribe(name);
    }
    tailSubs.clear();
    tailRe = pattern ? globRe(pattern) : null;
    if (pattern && !pattern.includes('*')) known.add(pattern);
    for (const name of known) maybeTail(name);
    const url = new URL(location.href);
    url.searchParams.set('tail', pattern);
    history.replaceState(null, '', url);
    tailInfo();
  }

  function addKnown(name) {
    if (known.has(name)) return;
    known.add(name);
    maybeTail(name);
  }

  function maybeTail(name) {
    if (!pusher || !tailRe || tailSubs.has(name) || !tailable(name) || !tailRe.test(name)) return;
    if (tailSubs.size >= TAIL_SUBS_MAX) return;
    const ch = pusher.subscribe(name);
    const fn = (event, data) => onTail(name, event, data);
    ch.bind_global(fn);
    tailSubs.set(name, { ch, fn });
    tailInfo();
  }

  function tailInfo() {
    const n = tailSubs.size;
    $('tail-info').textContent = tailRe
      ? n + ' channel' + (n === 1 ? '' : 's') + (n >= TAIL_SUBS_MAX ? ' (limit)' : '')
      : 'nothing followed';
  }

  function onTail(channel, event, data) {
    if (event.startsWith('pusher:') || event.startsWith('pusher_internal:')) return;
    if ($('tail-pause').checked) return;
    const li = el('li');
    const text = typeof data === 'string' ? data : JSON.stringify(data);
    li.append(
      el('time', new Date().toISOString().slice(11, 23)),
      el('span', channel, 'ch'),
      el('b', event),
      el('code', text.length > 300 ? text.slice(0, 300) + '…' : text));
    const ol = $('tail');
    ol.prepend(li);
    while (ol.children.length > TAIL_MAX) ol.lastChild.remove();
  }

  // ---- start -------------------------------------------------------------------------------------

  $('tail-pattern').value = params.get('tail') || 'sports.*.leagues.*.matches.*';
  $('tail-form').addEventListener('submit', (e) => {
    e.preventDefault();
    setTail($('tail-pattern').value);
  });
  if (typeof Pusher === 'undefined') {
    showError('pusher-js did not load (/console/pusher.min.js).');
    return;
  }
  setInterval(renderScoreboard, 250);
  pollLoop();
})();
