/*!
 * bts-guru resume plugin: no missed events on reconnect, for unmodified pusher-js 8 and
 * Laravel Echo 2. Served by the daemon at /bts-guru/resume.js (this file, UMD: a <script>
 * defines window.BtsGuruResume, require() returns it) and /bts-guru/resume.mjs (ES module,
 * default export).
 *
 *   BtsGuruResume.attach(pusher);                    // pusher-js
 *   BtsGuruResume.attach(Echo.connector.pusher);     // Laravel Echo
 *
 * Events on a positioned channel (the server's `resume` setting) carry their position as a
 * last top-level member, "bts_position":"<epoch>:<offset>", which pusher-js does not decode.
 * This plugin reads it from the raw frames, remembers the last position per channel, and adds
 * it to the `pusher:subscribe` pusher-js sends on every (re)subscribe. The server then sends,
 * right after `subscription_succeeded`, exactly the events the client missed, and on the
 * channel a `bts:recovered` event: {recovered: true, missed: N}, or {recovered: false,
 * missed: N|null} when its history could not cover the gap (fetch a fresh snapshot then).
 * Nothing else changes: the app's bindings see the same events as without it.
 */
(function (root, factory) {
  if (typeof module === 'object' && module && module.exports) {
    module.exports = factory();
  } else {
    root.BtsGuruResume = factory();
  }
})(
  typeof self !== 'undefined' ? self : typeof globalThis !== 'undefined' ? globalThis : this,
  function () {
    'use strict';

    var FIELD = 'bts_position';
    // A positioned frame ends with this member; a frame's data is a JSON string, in which an
    // unescaped `"` cannot occur, so only the server's own member can match.
    var MARK = ',"' + FIELD + '":"';
    var ATTACHED = '__btsGuruResume';

    function has(o, k) {
      return Object.prototype.hasOwnProperty.call(o, k);
    }

    /**
     * Makes every subscription of `pusher` to a positioned channel resume on each reconnect.
     * Returns a handle: `position(channel)` (the last position seen), `detach()`.
     */
    function attach(pusher) {
      if (!pusher || !pusher.connection || typeof pusher.send_event !== 'function') {
        throw new Error(
          'BtsGuruResume.attach: expected a pusher-js Pusher instance (Laravel Echo: Echo.connector.pusher)'
        );
      }
      if (pusher[ATTACHED]) {
        return pusher[ATTACHED];
      }
      // Channel name -> last position seen ("<epoch>:<offset>").
      var positions = {};

      // 1. Subscribes carry the last position seen; an unsubscribe forgets it.
      var send = pusher.send_event;
      pusher.send_event = function (name, data, channel) {
        if (data && typeof data.channel === 'string') {
          if (name === 'pusher:subscribe' && has(positions, data.channel)) {
            var copy = {};
            for (var k in data) {
              if (has(data, k)) copy[k] = data[k];
            }
            copy[FIELD] = positions[data.channel];
            data = copy;
          } else if (name === 'pusher:unsubscribe') {
            delete positions[data.channel];
          }
        }
        return send.call(pusher, name, data, channel);
      };

      // 2. Positions come from the raw frames (pusher-js decodes only event, channel, data).
      function onMessage(ev) {
        var text = ev && ev.data;
        if (typeof text !== 'string' || text.indexOf(MARK) < 0) return;
        var msg;
        try {
          msg = JSON.parse(text);
        } catch (e) {
          return;
        }
        var ch = msg.channel;
        var pos = msg[FIELD];
        if (typeof ch !== 'string' || typeof pos !== 'string') return;
        if (msg.event === 'pusher_internal:subscription_succeeded') {
          // A first subscribe starts at the position it names. A resume keeps its own until
          // the replay moves it: if the connection drops mid-replay, the next resume asks for
          // the rest.
          if (!has(positions, ch)) positions[ch] = pos;
          return;
        }
        // Events (live or replayed) and bts:recovered (after a replay, or the new position
        // when the gap could not be covered).
        positions[ch] = pos;
      }

      var transports = [];
      function hook() {
        var conn = pusher.connection && pusher.connection.connection;
        var transport = conn && conn.transport;
        if (!transport || typeof transport.bind !== 'function') return;
        if (transports.indexOf(transport) >= 0) return;
        // Bound after pusher-js's own listener: the app's handlers run first.
        transport.bind('message', onMessage);
        transports.push(transport);
        // Only the current transport matters; forget dead ones.
        if (transports.length > 4) transports.shift();
      }
      // Each (re)connection has a new transport; pusher-js subscribes on the same event, and
      // no frame can arrive before this runs.
      pusher.connection.bind('connected', hook);
      hook();

      var handle = {
        position: function (channel) {
          return has(positions, channel) ? positions[channel] : null;
        },
        detach: function () {
          pusher.send_event = send;
          pusher.connection.unbind('connected', hook);
          for (var i = 0; i < transports.length; i++) {
            transports[i].unbind('message', onMessage);
          }
          transports = [];
          delete pusher[ATTACHED];
        },
      };
      pusher[ATTACHED] = handle;
      return handle;
    }

    return { attach: attach, version: 1 };
  }
);
