"""The official MCP Python SDK against a cluster of ampoule replicas (argv: their root URLs;
key: $AMPOULE_API_KEY): one MCP client per replica, each connected to its replica's /mcp, all
driving one named session (held by one replica, so most calls reach it through another):
state across calls, a file uploaded through one replica and downloaded and listed through
the others. Then a session started without a name through one replica, used through another.
Prints "session NAME" and "cluster mcp OK"; any failure raises."""

import asyncio
import base64
import json
import os
import sys
import uuid
from contextlib import AsyncExitStack

from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client

URLS = [u.rstrip("/") + "/mcp" for u in sys.argv[1:]]
KEY = os.environ["AMPOULE_API_KEY"]
NAME = "mcp-cluster-" + uuid.uuid4().hex[:12]


def summary(r):
    assert not r.isError, r
    text = [c for c in r.content if c.type == "text"]
    return json.loads(text[0].text)


async def main():
    async with AsyncExitStack() as stack:
        clients = []
        for url in URLS:
            read, write, _ = await stack.enter_async_context(
                streamablehttp_client(url, headers={"Authorization": f"Bearer {KEY}"})
            )
            s = await stack.enter_async_context(ClientSession(read, write))
            await s.initialize()
            clients.append(s)

        print("session", NAME, flush=True)
        out = summary(await clients[0].call_tool("execute_code", {"code": "x = 40", "session": NAME}))
        assert out["session"] == NAME, out
        for i, s in enumerate(clients[1:], 1):
            out = summary(await s.call_tool("execute_code", {"code": "x += 1\nx", "session": NAME}))
            assert out["result"] == str(40 + i), (i, out)

        data = base64.b64encode(b"across replicas").decode()
        summary(await clients[-1].call_tool(
            "upload_file",
            {"session": NAME, "path": "m.txt", "content": data, "encoding": "base64"},
        ))
        got = await clients[0].call_tool("download_file", {"session": NAME, "path": "m.txt"})
        assert not got.isError, got
        res = [c.resource for c in got.content if c.type == "resource"]
        assert [getattr(r, "text", None) for r in res] == ["across replicas"], got
        files = summary(await clients[1].call_tool("list_files", {"session": NAME}))
        assert "m.txt" in json.dumps(files), files

        out = summary(await clients[1].call_tool("execute_code", {"code": "y = 7"}))
        unnamed = out["session"]
        out = summary(await clients[2 % len(clients)].call_tool(
            "execute_code", {"code": "y * 6", "session": unnamed}))
        assert out["result"] == "42", out
        r = await clients[0].call_tool("delete_session", {"session": unnamed})
        assert not r.isError, r
        r = await clients[1].call_tool("execute_code", {"code": "y", "session": unnamed})
        assert not r.isError and "NameError" in json.dumps(summary(r)), r
        print("cluster mcp OK", flush=True)


asyncio.run(main())
