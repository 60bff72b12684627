// The headline E2B scenario in JavaScript, written as a user of E2B's cloud writes it, run
// against `ampoule serve` by crates/server/tests/e2b.rs with only E2B_API_URL, E2B_SANDBOX_URL
// (both the server's root URL) and E2B_API_KEY (an ampoule key) set.
//
// The one thing an E2B-cloud script would not do: a sandbox port is reached through the
// server's root URL with the `Host` header `getHost` answered (there is no wildcard DNS here),
// plus the sandbox's traffic access token.
//
// One line per check; the first failure ends the script with a non-zero status and its reason.

import http from 'node:http'
import { randomBytes, randomUUID } from 'node:crypto'
import { Sandbox } from '@e2b/code-interpreter'

const RUN = randomUUID().replace(/-/g, '').slice(0, 12)

async function check(name, fn) {
  let detail
  try {
    detail = await fn()
  } catch (e) {
    console.log(`FAIL ${name}: ${e?.name ?? 'Error'}: ${e?.message ?? e}`)
    console.error(e)
    process.exit(1)
  }
  console.log(`ok   ${name}${detail ? ` (${detail})` : ''}`)
}

function expect(cond, message) {
  if (!cond) throw new Error(message)
}

// GET `path` on the sandbox's `port`: E2B's https://{getHost(port)}{path}, sent to the
// server's root URL with that name as `Host`.
function portGet(sbx, port, path) {
  const root = new URL(process.env.E2B_SANDBOX_URL)
  const headers = { host: sbx.getHost(port) }
  if (sbx.trafficAccessToken) headers['e2b-traffic-access-token'] = sbx.trafficAccessToken
  return new Promise((resolve, reject) => {
    const req = http.get(
      { hostname: root.hostname, port: root.port, path, headers, timeout: 30000 },
      (res) => {
        const chunks = []
        res.on('data', (c) => chunks.push(c))
        res.on('end', () => resolve({ status: res.statusCode, body: Buffer.concat(chunks).toString() }))
      },
    )
    req.on('timeout', () => req.destroy(new Error('timed out')))
    req.on('error', reject)
  })
}

async function listAll() {
  const paginator = Sandbox.list()
  const all = []
  do {
    all.push(...(await paginator.nextItems()))
  } while (paginator.hasNext)
  return all
}

let sbx

await check('create', async () => {
  sbx = await Sandbox.create({ metadata: { suite: 'smoke-js', run: RUN }, timeoutMs: 300_000 })
  expect(sbx.sandboxId, 'no sandbox id')
  return sbx.sandboxId
})

await check('runCode pandas and a chart -> PNG', async () => {
  const ex = await sbx.runCode(
    [
      'import pandas as pd',
      'import matplotlib.pyplot as plt',
      "df = pd.DataFrame({'x': [1, 2, 3], 'y': [1, 4, 9]})",
      "print(df['y'].sum())",
      "plt.plot(df['x'], df['y'])",
      "plt.title('squares')",
      'plt.show()',
    ].join('\n'),
  )
  expect(!ex.error, `error: ${JSON.stringify(ex.error)}`)
  expect(ex.logs.stdout.join('').trim() === '14', `stdout ${JSON.stringify(ex.logs.stdout)}`)
  const png = ex.results.find((r) => r.png)?.png
  expect(png, `no PNG result among ${JSON.stringify(ex.results).slice(0, 300)}`)
  const raw = Buffer.from(png, 'base64')
  expect(raw.subarray(0, 8).equals(Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a])), 'the PNG result is not a PNG')
  return `${raw.length} bytes of PNG`
})

await check('runCode value', async () => {
  const ex = await sbx.runCode('6 * 7')
  expect(!ex.error, `error: ${JSON.stringify(ex.error)}`)
  expect(ex.text === '42', `text ${JSON.stringify(ex.text)}`)
})

await check('commands.run pip list | head', async () => {
  const r = await sbx.commands.run('pip list | head')
  expect(r.exitCode === 0, `exit ${r.exitCode}: ${r.stderr}`)
  const lines = r.stdout.split('\n').filter((l) => l)
  expect(lines.length > 2 && /^Package\s+Version/.test(lines[0]), `stdout ${JSON.stringify(r.stdout)}`)
  return `${lines.length - 2} packages shown`
})

await check('files.write then files.read', async () => {
  await sbx.files.write('/mnt/data/hello.txt', 'hello from e2b\n')
  const got = await sbx.files.read('/mnt/data/hello.txt')
  expect(got === 'hello from e2b\n', `read ${JSON.stringify(got)}`)
})

await check('upload and download bytes', async () => {
  const payload = Buffer.concat([Buffer.from([...Array(256 * 1024).keys()].map((i) => i % 256)), randomBytes(4096)])
  const ab = payload.buffer.slice(payload.byteOffset, payload.byteOffset + payload.length)
  await sbx.files.write('/mnt/data/blob.bin', ab)
  const got = await sbx.files.read('/mnt/data/blob.bin', { format: 'bytes' })
  expect(Buffer.from(got).equals(payload), `${got.length} bytes back for ${payload.length}, or not the same`)
  const ex = await sbx.runCode("import os; print(os.path.getsize('/mnt/data/blob.bin'))")
  expect(ex.logs.stdout.join('').trim() === String(payload.length), JSON.stringify(ex.logs.stdout))
  return `${payload.length} bytes`
})

await check('background http.server through getHost', async () => {
  const handle = await sbx.commands.run('python -m http.server 8000', { background: true, cwd: '/mnt/data' })
  expect(handle.pid, 'no pid')
  const deadline = Date.now() + 30_000
  let last
  while (Date.now() < deadline) {
    try {
      last = await portGet(sbx, 8000, '/hello.txt')
      if (last.status === 200) break
    } catch (e) {
      last = e
    }
    await new Promise((r) => setTimeout(r, 500))
  }
  expect(last?.status === 200, `port 8000 never answered 200: ${last?.status ?? last} ${String(last?.body ?? '').slice(0, 300)}`)
  expect(last.body === 'hello from e2b\n', `body ${JSON.stringify(last.body)}`)
  return `${sbx.getHost(8000)} served hello.txt`
})

await check('Sandbox.list shows it with its metadata', async () => {
  const found = (await listAll()).find((i) => i.sandboxId === sbx.sandboxId)
  expect(found, 'the sandbox is not in Sandbox.list()')
  expect(found.metadata?.suite === 'smoke-js' && found.metadata?.run === RUN, `metadata ${JSON.stringify(found.metadata)}`)
})

await check('pause, connect, state and files kept', async () => {
  await sbx.runCode('kept = 6 * 7')
  expect((await sbx.pause()) === true, 'pause() did not answer true')
  expect((await sbx.pause()) === false, 'a second pause() did not answer false (already paused)')
  const paused = (await sbx.getInfo()).state
  expect(paused === 'paused', `state ${paused} while paused`)
  sbx = await Sandbox.connect(sbx.sandboxId)
  const r = await sbx.runCode('kept')
  expect(r.text === '42', `the variable did not survive the pause: ${r.text}`)
  const body = await sbx.files.read('/mnt/data/hello.txt')
  expect(body === 'hello from e2b\n', `hello.txt after the pause: ${JSON.stringify(body)}`)
  const running = (await sbx.getInfo()).state
  expect(running === 'running', `state ${running} after connect`)
})

await check('setTimeout', async () => {
  const before = (await sbx.getInfo()).endAt
  await sbx.setTimeout(900_000)
  const after = (await sbx.getInfo()).endAt
  expect(after > before, `endAt ${before?.toISOString?.()} -> ${after?.toISOString?.()}`)
  return `endAt ${before.toISOString()} -> ${after.toISOString()}`
})

await check('kill, then it is gone', async () => {
  const id = sbx.sandboxId
  expect((await sbx.kill()) === true, 'kill() did not answer true')
  expect(!(await sbx.isRunning()), 'still running after kill')
  expect(!(await listAll()).some((i) => i.sandboxId === id), 'still listed after kill')
  expect((await Sandbox.kill(id)) === false, 'a second kill found it')
})

console.log('smoke.mjs: all checks passed')
