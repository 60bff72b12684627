"""Drives ampoule's MCP server with the official MCP Python SDK (`mcp` on PyPI).

    mcp_smoke.py http URL API_KEY       streamable HTTP (`ampoule serve` at /mcp)
    mcp_smoke.py stdio BINARY [ARG...]  stdio (`ampoule mcp`)

Checks: the tool list and its schemas, Python that prints and returns a value, a matplotlib
chart as image content, state across two calls in one session, upload then download, files
as resources, and that bad calls come back as tool errors. With MCP_SMOKE_KERNEL_RELEASE set,
also that the code sees that kernel release (a gVisor pool: 4.4.0). Prints `ok: ...` lines; exits
non-zero on the first failure.
"""

import asyncio
import base64
import json
import os
import sys
from contextlib import asynccontextmanager

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamablehttp_client

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check(cond, what, detail=""):
    if not cond:
        raise SystemExit(f"FAILED: {what}: {detail}")
    print(f"ok: {what}", flush=True)


def summary(result):
    text = [c for c in result.content if c.type == "text"]
    assert text, result
    return json.loads(text[0].text)


@asynccontextmanager
async def connect(argv):
    if argv[0] == "http":
        url, key = argv[1], argv[2]
        async with streamablehttp_client(url, headers={"Authorization": f"Bearer {key}"}) as (
            read,
            write,
            _,
        ):
            async with ClientSession(read, write) as s:
                yield s
    elif argv[0] == "stdio":
        params = StdioServerParameters(command=argv[1], args=argv[2:])
        async with stdio_client(params) as (read, write):
            async with ClientSession(read, write) as s:
                yield s
    else:
        raise SystemExit(f"unknown transport {argv[0]}")


async def main(argv):
    async with connect(argv) as s:
        init = await s.initialize()
        check(init.serverInfo.name == "ampoule", "initialize", init.serverInfo)

        tools = {t.name: t for t in (await s.list_tools()).tools}
        want = {"execute_code", "upload_file", "download_file", "list_files", "list_sessions", "delete_session"}
        check(want <= set(tools), "list tools", sorted(tools))
        schema = tools["execute_code"].inputSchema
        check("code" in schema["properties"] and schema.get("required") == ["code"], "execute_code schema", schema)
        check(len(tools["execute_code"].description) > 40, "execute_code description")

        r = await s.call_tool("execute_code", {"language": "python", "code": "print('hello from mcp')\n6 * 7"})
        out = summary(r)
        check(not r.isError and out["stdout"] == "hello from mcp\n" and out["result"] == "42", "print and return", out)
        session = out["session"]
        check(bool(session), "a session name comes back", out)

        r = await s.call_tool("execute_code", {"code": "x = 41", "session": "mcp-state"})
        check(not r.isError, "first call of a named session", r)
        r = await s.call_tool("execute_code", {"code": "x + 1", "session": "mcp-state"})
        out = summary(r)
        check(out["result"] == "42" and out["session"] == "mcp-state", "state across calls", out)

        # On a pool of another isolation tier, the kernel the code sees (gVisor's: 4.4.0).
        release = os.environ.get("MCP_SMOKE_KERNEL_RELEASE")
        if release:
            r = await s.call_tool("execute_code", {"code": "import platform\nplatform.release()", "session": "mcp-state"})
            out = summary(r)
            check(out["result"] == repr(release), f"the code runs on kernel {release}", out)

        r = await s.call_tool("execute_code", {"code": "1 / 0", "session": "mcp-state"})
        out = summary(r)
        check(out["status"] == "failed" and out["error"]["name"] == "ZeroDivisionError", "an exception is reported", out)

        chart = "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.title('mcp')\nplt.show()"
        r = await s.call_tool("execute_code", {"code": chart, "session": "mcp-state"})
        images = [c for c in r.content if c.type == "image"]
        check(not r.isError and len(images) == 1, "a chart comes back as an image", r.content[0])
        check(images[0].mimeType == "image/png" and base64.b64decode(images[0].data).startswith(PNG_MAGIC), "the image is a PNG")

        r = await s.call_tool("upload_file", {"session": "mcp-state", "path": "/mnt/data/in.csv", "content": "a,b\n1,2\n"})
        check(not r.isError and summary(r)["size"] == 8, "upload text", r.content)
        blob = bytes(range(256))
        r = await s.call_tool("upload_file", {"session": "mcp-state", "path": "bin/data.bin", "content": base64.b64encode(blob).decode(), "encoding": "base64"})
        check(not r.isError, "upload base64", r.content)
        r = await s.call_tool("execute_code", {"code": "open('/mnt/data/in.csv').read().count(',')", "session": "mcp-state"})
        check(summary(r)["result"] == "2", "code reads the upload", summary(r))

        r = await s.call_tool("download_file", {"session": "mcp-state", "path": "in.csv"})
        res = r.content[0].resource
        check(not r.isError and res.text == "a,b\n1,2\n", "download text", r.content)
        r = await s.call_tool("download_file", {"session": "mcp-state", "path": "/mnt/data/bin/data.bin"})
        res = r.content[0].resource
        check(base64.b64decode(res.blob) == blob, "download a blob", r.content)

        r = await s.call_tool("list_files", {"session": "mcp-state"})
        paths = {f["path"] for f in summary(r)["files"]}
        check({"in.csv", "bin/data.bin"} <= paths, "list files", paths)

        resources = (await s.list_resources()).resources
        uris = [str(x.uri) for x in resources]
        mine = [u for u in uris if u.endswith("/files/in.csv") and "mcp-state" in u]
        check(len(mine) == 1, "files are resources", uris)
        read = await s.read_resource(mine[0])
        check(read.contents[0].text == "a,b\n1,2\n", "read a resource", read)

        r = await s.call_tool("list_sessions", {})
        names = {x["session"] for x in summary(r)["sessions"]}
        check({"mcp-state", session} <= names, "list sessions", names)

        # Errors are tool errors with a message, never protocol failures.
        r = await s.call_tool("download_file", {"session": "mcp-state", "path": "missing.txt"})
        check(r.isError and "missing.txt" in r.content[0].text, "a missing file is a tool error", r.content)
        r = await s.call_tool("download_file", {"session": "mcp-state", "path": "../../etc/passwd"})
        check(r.isError, "a path outside /mnt/data is a tool error", r.content)
        r = await s.call_tool("list_files", {"session": "no-such-session"})
        check(r.isError and "no-such-session" in r.content[0].text, "an unknown session is a tool error", r.content)
        r = await s.call_tool("execute_code", {"language": "cobol", "code": "1"})
        check(r.isError and "cobol" in r.content[0].text, "an unknown language is a tool error", r.content)
        r = await s.call_tool("execute_code", {"session": "mcp-state"})
        check(r.isError and "code" in r.content[0].text, "a missing argument is a tool error", r.content)

        for name in ("mcp-state", session):
            r = await s.call_tool("delete_session", {"session": name})
            check(not r.isError, f"delete session {name}", r.content)
        r = await s.call_tool("list_sessions", {})
        names = {x["session"] for x in summary(r)["sessions"]}
        check("mcp-state" not in names, "deleted sessions are gone", names)
    print("mcp smoke: all passed", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
