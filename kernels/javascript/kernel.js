// ampoule's JavaScript kernel: runs code in one persistent Node.js global scope.
//
// Started by launch.sh, which leaves requests on fd 3, events on fd 4, the kernel's own log on
// fd 5, and fds 1 and 2 on FIFOs in the directory given as the first argument.
//
// Code is evaluated through the V8 inspector's REPL mode (what a browser console uses), which
// gives top-level await, `let`/`const` that survive between executions (and may be declared
// again), and the value of the last expression. A worker thread reads requests so that an
// `interrupt` still arrives while the main thread is busy: when the code is synchronous the
// worker terminates it through its own inspector session, when the code is awaiting the main
// thread abandons the execution. Either way the global scope is kept.
'use strict';

const fs = require('node:fs');
const inspector = require('node:inspector');
const util = require('node:util');
const { Worker } = require('node:worker_threads');
const { createRequire } = require('node:module');

const PROTOCOL_VERSION = 1;
const EVENTS_FD = 4;
const LOG_FD = 5;
const fifoDir = process.argv[2];

// -- events -------------------------------------------------------------------------------

function sleepMs(ms) {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

function writeAll(fd, buf) {
  let off = 0;
  while (off < buf.length) {
    try {
      off += fs.writeSync(fd, buf, off, buf.length - off);
    } catch (e) {
      if (e.code === 'EAGAIN') sleepMs(1);
      else throw e;
    }
  }
}

function send(msg) {
  const payload = Buffer.from(JSON.stringify(msg), 'utf8');
  const header = Buffer.alloc(4);
  header.writeUInt32BE(payload.length, 0);
  writeAll(EVENTS_FD, Buffer.concat([header, payload]));
}

function log(text) {
  try {
    writeAll(LOG_FD, Buffer.from(text));
  } catch (_) {
    // nothing left to tell
  }
}

// -- output ---------------------------------------------------------------------------------

let currentId = '';

function stream(name, chunk, encoding) {
  let text;
  if (typeof chunk === 'string') text = chunk;
  else if (chunk instanceof Uint8Array) text = Buffer.from(chunk).toString(encoding === 'buffer' ? 'utf8' : 'utf8');
  else text = String(chunk);
  if (text.length) send({ type: 'stream', id: currentId, name, text });
}

// The code's own writes (console.*, process.stdout.write) become events right away, in order.
for (const [name, target] of [['stdout', process.stdout], ['stderr', process.stderr]]) {
  target.write = function write(chunk, encoding, cb) {
    if (typeof encoding === 'function') {
      cb = encoding;
      encoding = undefined;
    }
    drainFifos();
    stream(name, chunk, encoding);
    if (typeof cb === 'function') process.nextTick(cb);
    return true;
  };
}

// Child processes and native code write to fds 1 and 2: read them back from the FIFOs.
const fifos = [];
for (const name of ['stdout', 'stderr']) {
  const path = `${fifoDir}/${name}`;
  const fd = fs.openSync(path, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
  fifos.push({ name, fd, decoder: new util.TextDecoder('utf-8', { fatal: false }) });
  fs.unlinkSync(path);
}
try {
  fs.rmdirSync(fifoDir);
} catch (_) {
  // left for the sandbox's end
}
const fifoBuf = Buffer.alloc(65536);

function drainFifos() {
  for (const f of fifos) {
    for (;;) {
      let n;
      try {
        n = fs.readSync(f.fd, fifoBuf, 0, fifoBuf.length, null);
      } catch (e) {
        if (e.code === 'EAGAIN' || e.code === 'EWOULDBLOCK') break;
        if (e.code === 'EINTR') continue;
        throw e;
      }
      if (n <= 0) break;
      const text = f.decoder.decode(fifoBuf.subarray(0, n), { stream: true });
      if (text.length) send({ type: 'stream', id: currentId, name: f.name, text });
    }
  }
}
// Poll often while code runs, rarely while idle (a warm session should cost nothing).
let drainTimer = setInterval(drainFifos, 1000);
drainTimer.unref();
function pollFifos(ms) {
  clearInterval(drainTimer);
  drainTimer = setInterval(drainFifos, ms);
  drainTimer.unref();
}

// -- values -----------------------------------------------------------------------------------

function isJson(v, depth = 0) {
  if (depth > 64) return false;
  if (v === null || typeof v === 'string' || typeof v === 'boolean') return true;
  if (typeof v === 'number') return Number.isFinite(v);
  if (Array.isArray(v)) return v.every((x) => isJson(x, depth + 1));
  if (typeof v === 'object') {
    const proto = Object.getPrototypeOf(v);
    if (proto !== Object.prototype && proto !== null) return false;
    return Object.values(v).every((x) => isJson(x, depth + 1));
  }
  return false;
}

function mimeBundle(value) {
  const data = {};
  if (value !== null && typeof value === 'object' && typeof value._repr_html_ === 'function') {
    try {
      data['text/html'] = String(value._repr_html_());
    } catch (_) {
      // a broken repr shows as text only
    }
  }
  if (isJson(value)) {
    const text = JSON.stringify(value);
    if (text !== undefined && text.length <= 1024 * 1024) data['application/json'] = value;
  }
  data['text/plain'] = util.inspect(value, { depth: 6, maxArrayLength: 200, breakLength: 100 });
  return data;
}

// display(value) shows a value; display(bundle, { raw: true }) sends a MIME bundle as it is.
function display(value, opts) {
  drainFifos();
  const data = opts && opts.raw ? value : mimeBundle(value);
  send({ type: 'display', id: currentId, data });
}

// -- evaluation -------------------------------------------------------------------------------

const session = new inspector.Session();
session.connect();
let captured;
Object.defineProperty(globalThis, '__ampoule_capture', {
  value: (v) => {
    captured = v;
  },
  enumerable: false,
});
globalThis.display = display;
globalThis.require = createRequire('/mnt/data/');

function post(method, params) {
  return new Promise((resolve, reject) =>
    session.post(method, params, (err, res) => (err ? reject(err) : resolve(res))));
}

// The real value behind an inspector RemoteObject.
async function realValue(remote) {
  if (!remote) return undefined;
  if (remote.objectId) {
    captured = undefined;
    await post('Runtime.callFunctionOn', {
      objectId: remote.objectId,
      functionDeclaration: 'function () { __ampoule_capture(this); }',
    });
    return captured;
  }
  if (remote.type === 'undefined') return undefined;
  if ('unserializableValue' in remote) {
    const u = remote.unserializableValue;
    if (u.endsWith('n')) return BigInt(u.slice(0, -1));
    return Number(u);
  }
  return remote.value;
}

function userStack(stack) {
  const lines = String(stack).split('\n');
  const out = [];
  for (const line of lines) {
    if (/node:inspector|kernel\.js|__ampoule_capture/.test(line)) break;
    out.push(line);
  }
  return out;
}

function errorFields(err) {
  if (err instanceof Error || (err && typeof err === 'object' && 'stack' in err && 'message' in err)) {
    return { ename: err.name || 'Error', evalue: String(err.message), traceback: userStack(err.stack || `${err.name}: ${err.message}`) };
  }
  const text = util.inspect(err);
  return { ename: 'Uncaught', evalue: text, traceback: [`Uncaught ${text}`] };
}

// Shared with the worker: [0] = 1 while the main thread is inside the synchronous part of an
// evaluation (the worker may terminate it), [1] = interrupts the main thread has seen.
const shared = new Int32Array(new SharedArrayBuffer(8));
let count = 0;
let pending = null; // { id, abandon } while an execution awaits

async function execute(req) {
  count += 1;
  const n = count;
  currentId = req.id;
  if (req.inputs && typeof req.inputs === 'object') globalThis.inputs = req.inputs;
  let status = 'ok';
  let abandon;
  const abandoned = new Promise((resolve) => {
    abandon = resolve;
  });
  pending = { id: req.id, abandon };
  pollFifos(20);
  try {
    Atomics.store(shared, 0, 1);
    let evaluation;
    try {
      evaluation = post('Runtime.evaluate', {
        expression: `${req.code}\n//# sourceURL=cell-${n}`,
        replMode: true,
        awaitPromise: true,
        objectGroup: 'cell',
      });
    } finally {
      Atomics.store(shared, 0, 0);
    }
    const res = await Promise.race([evaluation, abandoned]);
    if (res === 'interrupted') {
      status = 'interrupted';
      drainFifos();
      send({ type: 'error', id: req.id, ename: 'Interrupted', evalue: 'the execution was interrupted; it may still be running in the background', traceback: [] });
    } else if (res.exceptionDetails) {
      status = 'error';
      const details = res.exceptionDetails;
      const err = details.exception ? await realValue(details.exception) : details.text;
      const fields = errorFields(err);
      if (fields.traceback.length <= 1 && typeof details.lineNumber === 'number') {
        fields.traceback.push(`    at cell-${n}:${details.lineNumber + 1}:${details.columnNumber + 1}`);
      }
      drainFifos();
      send({ type: 'error', id: req.id, ...fields });
    } else {
      const value = await realValue(res.result);
      if (value !== undefined) {
        globalThis._ = value;
        drainFifos();
        send({ type: 'result', id: req.id, data: mimeBundle(value), execution_count: n });
      }
    }
  } catch (e) {
    // The inspector reports a terminated evaluation as a failed command.
    status = 'interrupted';
    drainFifos();
    const terminated = /terminated/i.test(String(e && e.message));
    send({ type: 'error', id: req.id, ename: terminated ? 'Interrupted' : 'KernelError', evalue: terminated ? 'the execution was interrupted' : String(e && e.message), traceback: [] });
  } finally {
    pending = null;
    pollFifos(1000);
    session.post('Runtime.releaseObjectGroup', { objectGroup: 'cell' }, () => {});
  }
  drainFifos();
  send({ type: 'done', id: req.id, status, execution_count: n });
}

// Unhandled errors of the code's callbacks are reported on stderr, never fatal to the kernel.
process.on('uncaughtException', (e) => {
  process.stderr.write(`Uncaught ${util.inspect(e)}\n`);
});
process.on('unhandledRejection', (e) => {
  process.stderr.write(`Unhandled promise rejection: ${util.inspect(e)}\n`);
});
process.on('SIGINT', () => {});

// -- requests -----------------------------------------------------------------------------------

const WORKER = `
const fs = require('node:fs');
const inspector = require('node:inspector');
const { parentPort, workerData } = require('node:worker_threads');
const shared = workerData.shared;
const session = new inspector.Session();
session.connectToMainThread();
function sleepMs(ms) { Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms); }
function readExact(n) {
  const buf = Buffer.alloc(n);
  let off = 0;
  while (off < n) {
    let got;
    try { got = fs.readSync(3, buf, off, n - off, null); }
    catch (e) { if (e.code === 'EAGAIN') { sleepMs(5); continue; } if (e.code === 'EINTR') continue; throw e; }
    if (got === 0) return null;
    off += got;
  }
  return buf;
}
for (;;) {
  const header = readExact(4);
  if (header === null) break;
  const len = header.readUInt32BE(0);
  if (len > 64 * 1024 * 1024) break;
  const payload = readExact(len);
  if (payload === null) break;
  const msg = JSON.parse(payload.toString('utf8'));
  if (msg.type === 'interrupt') {
    const seen = Atomics.load(shared, 1);
    parentPort.postMessage(msg);
    // A main thread that is free acknowledges at once; one stuck in synchronous code is
    // terminated (the inspector cancels the termination once the evaluation has unwound).
    if (Atomics.wait(shared, 1, seen, 300) === 'timed-out' && Atomics.load(shared, 0) === 1) {
      session.post('Runtime.terminateExecution', () => {});
    }
  } else {
    parentPort.postMessage(msg);
  }
}
parentPort.postMessage({ type: 'eof' });
`;

const queue = [];
let running = false;

async function pump() {
  if (running) return;
  running = true;
  while (queue.length) {
    const req = queue.shift();
    try {
      await execute(req);
    } catch (e) {
      log(`ampoule kernel: ${util.inspect(e)}\n`);
    }
  }
  running = false;
}

const worker = new Worker(WORKER, { eval: true, workerData: { shared } });
worker.on('message', (msg) => {
  if (msg.type === 'interrupt') {
    Atomics.add(shared, 1, 1);
    Atomics.notify(shared, 1);
    if (pending) pending.abandon('interrupted');
  } else if (msg.type === 'execute') {
    queue.push(msg);
    pump();
  } else if (msg.type === 'eof') {
    process.exit(0);
  }
});
worker.on('error', (e) => {
  log(`ampoule kernel: request reader failed: ${util.inspect(e)}\n`);
  process.exit(70);
});

send({ type: 'hello', protocol_version: PROTOCOL_VERSION, language: 'javascript', runtime: `Node.js ${process.version}` });
