// The Node peer of scripts/bench: a plain `ws` broadcast server. Clients on /sub get every
// frame the client on /pub sends; each subscriber is told "ok" once it is registered.
// Usage: node ws-broadcast.js [PORT]   (0 or nothing: any free port, printed on stdout)
'use strict';
const { WebSocketServer } = require('ws');

const port = Number(process.argv[2] || 0);
const wss = new WebSocketServer({ host: '127.0.0.1', port, perMessageDeflate: false, clientTracking: false });
const subs = new Set();

wss.on('connection', (ws, req) => {
  if (req.url.startsWith('/pub')) {
    ws.on('message', (data, isBinary) => {
      for (const s of subs) s.send(data, { binary: isBinary });
    });
    return;
  }
  subs.add(ws);
  ws.on('close', () => subs.delete(ws));
  ws.send('ok');
});
wss.on('listening', () => console.log(`ws-broadcast listening on ws://127.0.0.1:${wss.address().port}`));
