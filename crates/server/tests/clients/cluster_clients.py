"""The real LangChain ACA client against a cluster of ampoule replicas: one session id, each
call through another replica (argv: the replicas' endpoints). State, an upload, a download
and a listing must agree, whichever replica each call reached. Key: $AMPOULE_API_KEY.
Prints "cluster langchain OK"; any failure raises (non-zero exit)."""

import io
import json
import os
import sys
import uuid
import warnings

warnings.simplefilter("ignore")
from langchain_azure_dynamic_sessions import SessionsPythonREPLTool  # noqa: E402

EPS = [e.rstrip("/") for e in sys.argv[1:]]
TOKEN = os.environ["AMPOULE_API_KEY"]
session = "cluster-" + uuid.uuid4().hex


def via(i):
    return SessionsPythonREPLTool(
        pool_management_endpoint=EPS[i % len(EPS)],
        access_token_provider=lambda: TOKEN,
        session_id=session,
    )


json.loads(via(0).invoke("x = 40"))
out = json.loads(via(1).invoke("print('state'); x + 2"))
assert out["result"] == 42 and out["stdout"] == "state\n", out
md = via(2).upload_file(data=io.BytesIO(b"across replicas"), remote_file_path="c.txt")
assert (md.filename, md.size_in_bytes) == ("c.txt", 15), md
assert via(0).download_file(remote_file_path="c.txt").read() == b"across replicas"
assert [f.filename for f in via(1).list_files()] == ["c.txt"]
out = json.loads(via(2).invoke("open('c.txt').read() + str(x)"))
assert out["result"] == "across replicas40", out
print("cluster langchain OK", flush=True)
