"""Drive the real ACA dynamic-sessions client libraries against a running `ampoule serve`.

usage: python smoke_clients.py ENDPOINT [CLIENT...]
  ENDPOINT  the pool's base URL: http://127.0.0.1:PORT, http://127.0.0.1:PORT/pools/python,
            .../subscriptions/s/resourceGroups/r/sessionPools/python, or https://...
  CLIENT    langchain, llamaindex, autogen (default: these three), semantickernel (https only:
            Semantic Kernel refuses http:// endpoints)
The API key comes from $AMPOULE_API_KEY. For https, $REQUESTS_CA_BUNDLE and $SSL_CERT_FILE
name the server's certificate.

Each client, against a real interpreter: 6 * 7 -> 42, state kept across two executions in
one session, upload, list, download, delete. Derived from shared/research/aca-api.md §10.
Prints one "<client> OK" line per client; any failure raises (non-zero exit).
"""

import asyncio
import io
import json
import os
import sys
import tempfile
import types
import uuid
import warnings

import requests

warnings.simplefilter("ignore")
EP = sys.argv[1].rstrip("/")
WANTED = sys.argv[2:] or ["langchain", "llamaindex", "autogen"]
TOKEN = os.environ["AMPOULE_API_KEY"]
tmp = tempfile.mkdtemp()
with open(os.path.join(tmp, "data.csv"), "w") as f:
    f.write("a,b\n1,2\n")


def delete_session(identifier):
    """DELETE {ep}/session as LangChain sends it; the clients without a delete call use this."""
    r = requests.delete(
        f"{EP}/session",
        params={"identifier": identifier, "api-version": "2025-10-02-preview"},
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=60,
    )
    assert r.status_code == 204, (r.status_code, r.text)


def delete_file(identifier, name):
    r = requests.delete(
        f"{EP}/files/{name}",
        params={"identifier": identifier, "api-version": "2024-02-02-preview"},
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=60,
    )
    assert r.status_code == 200, (r.status_code, r.text)


def langchain():
    # api-version 2024-02-02-preview, plus DELETE /session at 2025-10-02-preview.
    from langchain_azure_dynamic_sessions import SessionsPythonREPLTool

    lc = SessionsPythonREPLTool(
        pool_management_endpoint=EP,
        access_token_provider=lambda: TOKEN,
        session_id="lc-" + uuid.uuid4().hex,
    )
    out = json.loads(lc.invoke("6 * 7"))
    assert out["result"] == 42, out
    json.loads(lc.invoke("x = 40"))
    out = json.loads(lc.invoke("print('state'); x + 2"))
    assert out["result"] == 42 and out["stdout"] == "state\n", out
    md = lc.upload_file(data=io.BytesIO(b"hello world!!!!!"), remote_file_path="test1.txt")
    assert (md.filename, md.size_in_bytes) == ("test1.txt", 16), md
    assert lc.download_file(remote_file_path="test1.txt").read() == b"hello world!!!!!"
    assert [f.filename for f in lc.list_files()] == ["test1.txt"]
    # The interpreter sees the upload in its working directory.
    out = json.loads(lc.invoke("open('test1.txt').read()"))
    assert out["result"] == "hello world!!!!!", out
    delete_file(lc.session_id, "test1.txt")
    assert lc.list_files() == []
    lc._delete_session_sync(lc.session_id)
    # A deleted session is gone: the same identifier starts afresh.
    out = json.loads(lc.invoke("'x' in globals()"))
    assert out["result"] is False, out
    lc._delete_session_sync(lc.session_id)
    print("langchain OK", flush=True)


def llamaindex():
    from llama_index.tools.azure_code_interpreter import AzureCodeInterpreterToolSpec

    li = AzureCodeInterpreterToolSpec(pool_management_endpoint=EP, session_id="li-" + uuid.uuid4().hex)
    li.access_token_provider = lambda: TOKEN  # no constructor argument for this
    r = li.code_interpreter("6 * 7")
    assert r["properties"]["result"] == 42, r
    li.code_interpreter("y = 6")
    r = li.code_interpreter("y * 7")
    assert r["properties"]["result"] == 42, r
    up = li.upload_file(local_file_path=os.path.join(tmp, "data.csv"))
    assert up[0].filename == "data.csv", up
    assert li.download_file_to_local("/mnt/data/data.csv").read() == b"a,b\n1,2\n"
    assert [f.filename for f in li.list_files()] == ["data.csv"]
    delete_file(li.session_id, "data.csv")
    assert li.list_files() == []
    delete_session(li.session_id)
    print("llama-index OK", flush=True)


def autogen():
    from autogen_core import CancellationToken
    from autogen_core.code_executor import CodeBlock
    from autogen_ext.code_executors.azure import ACADynamicSessionsCodeExecutor

    class Cred:
        def get_token(self, *scopes, **kw):
            return types.SimpleNamespace(token=TOKEN, expires_on=2**31)

    async def run():
        work = tempfile.mkdtemp()
        with open(os.path.join(work, "data.csv"), "w") as f:
            f.write("a,b\n1,2\n")
        sid = "ag-" + uuid.uuid4().hex
        ex = ACADynamicSessionsCodeExecutor(
            pool_management_endpoint=EP, credential=Cred(), work_dir=work, session_id=sid, timeout=120
        )
        ct = CancellationToken()
        r = await ex.execute_code_blocks([CodeBlock(code="6 * 7", language="python")], ct)
        assert r.exit_code == 0 and "42" in r.output, r
        await ex.execute_code_blocks([CodeBlock(code="z = 21", language="python")], ct)
        r = await ex.execute_code_blocks([CodeBlock(code="print(z * 2)", language="python")], ct)
        assert r.exit_code == 0 and "42" in r.output, r
        r = await ex.execute_code_blocks([CodeBlock(code="1 / 0", language="python")], ct)
        assert r.exit_code == 1 and "ZeroDivisionError" in r.output, r
        await ex.upload_files(["data.csv"], ct)
        assert "data.csv" in await ex.get_file_list(ct)
        os.remove(os.path.join(work, "data.csv"))
        await ex.download_files(["data.csv"], ct)
        with open(os.path.join(work, "data.csv")) as f:
            assert f.read() == "a,b\n1,2\n"
        delete_file(sid, "data.csv")
        assert "data.csv" not in await ex.get_file_list(ct)
        delete_session(sid)

    asyncio.run(run())
    print("autogen OK", flush=True)


def semantickernel():
    import httpx
    from semantic_kernel.core_plugins.sessions_python_tool import SessionsPythonSettings, SessionsPythonTool

    assert EP.startswith("https://"), "Semantic Kernel accepts https endpoints only"
    sid = "sk-" + uuid.uuid4().hex

    async def run():
        tool = SessionsPythonTool(
            auth_callback=lambda: TOKEN,
            pool_management_endpoint=EP,
            settings=SessionsPythonSettings(session_id=sid),
            http_client=httpx.AsyncClient(verify=os.environ["SSL_CERT_FILE"], timeout=240),
            enable_dangerous_file_uploads=True,
            allowed_upload_directories=[tmp],
        )
        out = await tool.execute_code("6 * 7")
        assert out.startswith("Status:\nSuccess\nResult:\n42\n"), out
        await tool.execute_code("w = 41")
        out = await tool.execute_code("w + 1")
        assert "Result:\n42\n" in out, out
        # After an execute, SK sends the upload's multipart body with Content-Type:
        # application/json (its shared client's headers were changed): the server sniffs it.
        md = await tool.upload_file(local_file_path=os.path.join(tmp, "data.csv"), remote_file_path="data.csv")
        assert (md.filename, md.size_in_bytes) == ("data.csv", 8), md
        assert [f.filename for f in await tool.list_files()] == ["data.csv"]
        data = await tool.download_file(remote_file_name="data.csv")
        assert data.read() == b"a,b\n1,2\n"
        out = await tool.execute_code("open('/mnt/data/data.csv').read()")
        assert "a,b" in out, out
        delete_file(sid, "data.csv")
        assert await tool.list_files() == []
        delete_session(sid)

    asyncio.run(run())
    print("semantic-kernel OK", flush=True)


CLIENTS = {"langchain": langchain, "llamaindex": llamaindex, "autogen": autogen, "semantickernel": semantickernel}
for name in WANTED:
    CLIENTS[name]()
