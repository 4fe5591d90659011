// A Node.js service for wirespan's span tests: on each request it calls the next service (if
// given) and answers with a chunked body (no Content-Length, three writes).
const http = require('http');

const port = Number(process.argv[2]);
const next = process.argv[3];

http.createServer((req, res) => {
  const answer = (extra) => {
    res.writeHead(200, { 'content-type': 'text/plain' });
    res.write('node\n');
    res.write(extra || '');
    res.end('end\n');
  };
  if (!next) return answer();
  http.get(next + '?from=node', (r) => {
    let body = '';
    r.on('data', (d) => { body += d; });
    r.on('end', () => answer(body));
  }).on('error', () => { res.writeHead(502); res.end(); });
}).listen(port, '127.0.0.1');
