#!/usr/bin/env python3
"""A loopback imitation of the Hugging Face Hub endpoints ftx calls, for the tests (tests/hub.rs).

    python3 tests/fake_hub.py ROOT     # prints "port N" on its first line, then serves on 127.0.0.1:N

Standard library only. ROOT holds the repositories and the server's settings:

    ROOT/hub.json                      {"token": "...", "gated": ["org/name"], "cut_once": ["file"],
                                        "lfs_threshold": bytes, "chunk_size": bytes}  (read per request)
    ROOT/{models,datasets}/org/name/refs.json           {"main": "<commit>", ...}
    ROOT/{models,datasets}/org/name/commits/<commit>/…  the files of each commit
    ROOT/{models,datasets}/org/name/commits.jsonl       one line a pushed commit (summary, files)
    ROOT/lfs/<sha256>                                   uploaded LFS objects
    ROOT/requests.jsonl                                 one line a request: method, path, Range, whether authorised

Download side, as huggingface.co answers: GET /api/{models,datasets}/{repo}/revision/{rev} ->
{"sha", "siblings"}; GET|HEAD /{repo}/resolve/{rev}/{file} (datasets: /datasets/{repo}/...) with
ETag (the content's sha256), X-Repo-Commit, Content-Length and Range (206 + Content-Range);
404 with X-Error-Code RepoNotFound / RevisionNotFound / EntryNotFound; 401 GatedRepo for a
gated repository without the token. A file named in "cut_once" has its first full transfer cut
half-way (headers promise the whole file, the connection closes early).

Upload side, as huggingface_hub's create_repo / create_commit use it: POST /api/repos/create
(409 when it exists), POST /api/models/{repo}/branch/{rev}, POST /api/models/{repo}/preupload/{rev}
(uploadMode "lfs" at or above lfs_threshold), POST /{repo}.git/info/lfs/objects/batch (basic PUT,
or multipart with a chunk_size header above chunk_size; a verify action), the PUT/POST targets it
hands out (they check sizes and hashes, and refuse chunked bodies as object storage does), and
POST /api/models/{repo}/commit/{rev} (NDJSON: header, file with base64 content, lfsFile pointers).
"""
import base64
import hashlib
import json
import os
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

ROOT = sys.argv[1]
LOCK = threading.Lock()
CUT_DONE = set()


def settings():
    try:
        with open(os.path.join(ROOT, "hub.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def repo_dir(kind, repo):
    return os.path.join(ROOT, kind, *repo.split("/"))


def read_refs(kind, repo):
    try:
        with open(os.path.join(repo_dir(kind, repo), "refs.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def commit_of(kind, repo, rev):
    refs = read_refs(kind, repo)
    if refs is None:
        return None, "RepoNotFound"
    if rev in refs:
        return refs[rev], None
    if re.fullmatch(r"[0-9a-f]{40}", rev) and os.path.isdir(os.path.join(repo_dir(kind, repo), "commits", rev)):
        return rev, None
    return None, "RevisionNotFound"


def files_of(kind, repo, commit):
    base = os.path.join(repo_dir(kind, repo), "commits", commit)
    out = []
    for d, _, names in os.walk(base):
        for n in names:
            out.append(os.path.relpath(os.path.join(d, n), base).replace(os.sep, "/"))
    return sorted(out)


def sha256(b):
    return hashlib.sha256(b).hexdigest()


class Hub(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def authorised(self):
        token = settings().get("token")
        return token is not None and self.headers.get("Authorization") == f"Bearer {token}"

    def record(self):
        line = {"method": self.command, "path": self.path, "range": self.headers.get("Range"), "auth": self.authorised()}
        with LOCK, open(os.path.join(ROOT, "requests.jsonl"), "a") as f:
            f.write(json.dumps(line) + "\n")

    def reply(self, status, body=b"", headers=None, error_code=None):
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if error_code:
            self.send_header("X-Error-Code", error_code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return None
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))

    # ---- downloads ----

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        self.record()
        path = unquote(self.path.split("?")[0])
        m = re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)/revision/(.+)", path)
        if m:
            kind, repo, rev = m.groups()
            commit, err = commit_of(kind, repo, rev)
            if err:
                return self.reply(404, {"error": f"{err}: {repo}@{rev}"}, error_code=err)
            return self.reply(200, {"id": repo, "sha": commit, "siblings": [{"rfilename": f} for f in files_of(kind, repo, commit)]})
        m = re.fullmatch(r"/(datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            return self.resolve("datasets" if m.group(1) else "models", m.group(2), m.group(3), m.group(4))
        self.reply(404, {"error": "no such endpoint"})

    def resolve(self, kind, repo, rev, file):
        cfg = settings()
        if repo in cfg.get("gated", []) and not self.authorised():
            return self.reply(401, {"error": f"Access to {repo} is restricted"}, error_code="GatedRepo")
        commit, err = commit_of(kind, repo, rev)
        if err:
            return self.reply(404, {"error": err}, error_code=err)
        local = os.path.join(repo_dir(kind, repo), "commits", commit, *file.split("/"))
        if not os.path.isfile(local):
            return self.reply(404, {"error": f"{file} not found"}, error_code="EntryNotFound")
        with open(local, "rb") as f:
            data = f.read()
        total = len(data)
        headers = {"ETag": f'"{sha256(data)}"', "X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
        status, start, end = 200, 0, total - 1
        rng = self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if not m or int(m.group(1)) >= max(total, 1):
                return self.reply(416, b"", {"Content-Range": f"bytes */{total}"})
            start = int(m.group(1))
            end = min(int(m.group(2)), total - 1) if m.group(2) else total - 1
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{total}"
        chunk = data[start:end + 1]
        cut = file in cfg.get("cut_once", []) and len(chunk) > 1 and self.command == "GET"
        with LOCK:
            cut = cut and (kind, repo, file) not in CUT_DONE
            if cut:
                CUT_DONE.add((kind, repo, file))
        if not cut:
            return self.reply(status, chunk, headers)
        # Promise the whole range, send half, and drop the connection.
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(chunk)))
        self.end_headers()
        self.wfile.write(chunk[: len(chunk) // 2])
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(2)

    # ---- uploads ----

    def do_PUT(self):
        self.record()
        m = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", self.path)
        p = re.fullmatch(r"/lfs-part/([0-9a-f]{64})/(\d+)", self.path)
        body = self.body()
        if body is None:
            return self.reply(411, {"error": "chunked bodies are refused: send Content-Length"})
        if m:
            if sha256(body) != m.group(1):
                return self.reply(400, {"error": "content does not match the oid"})
            os.makedirs(os.path.join(ROOT, "lfs"), exist_ok=True)
            with open(os.path.join(ROOT, "lfs", m.group(1)), "wb") as f:
                f.write(body)
            return self.reply(200)
        if p:
            d = os.path.join(ROOT, "lfs-parts", p.group(1))
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, "%05d" % int(p.group(2))), "wb") as f:
                f.write(body)
            return self.reply(200, b"", {"ETag": f'"{hashlib.md5(body).hexdigest()}"'})
        self.reply(404, {"error": "no such endpoint"})

    def do_POST(self):
        self.record()
        path = unquote(self.path.split("?")[0])
        body = self.body()
        cfg = settings()
        if body is None:
            return self.reply(411, {"error": "chunked bodies are refused"})
        base = f"http://{self.headers.get('Host')}"
        if path.startswith("/lfs-complete/"):
            oid = path.rsplit("/", 1)[1]
            req = json.loads(body)
            d = os.path.join(ROOT, "lfs-parts", oid)
            data = b""
            for i, part in enumerate(req["parts"], 1):
                with open(os.path.join(d, "%05d" % i), "rb") as f:
                    chunk = f.read()
                if part["partNumber"] != i or part["etag"].strip('"') != hashlib.md5(chunk).hexdigest():
                    return self.reply(400, {"error": f"part {i}: wrong number or etag"})
                data += chunk
            if sha256(data) != oid or req.get("oid") != oid:
                return self.reply(400, {"error": "the parts do not make the object"})
            os.makedirs(os.path.join(ROOT, "lfs"), exist_ok=True)
            with open(os.path.join(ROOT, "lfs", oid), "wb") as f:
                f.write(data)
            return self.reply(200, {})
        if path.startswith("/lfs-verify/"):
            oid = path.rsplit("/", 1)[1]
            req = json.loads(body)
            obj = os.path.join(ROOT, "lfs", oid)
            if not self.authorised() or not os.path.isfile(obj) or os.path.getsize(obj) != req.get("size"):
                return self.reply(404, {"error": "object missing or of another size"})
            return self.reply(200, {})
        if not self.authorised():
            return self.reply(401, {"error": "Invalid credentials in Authorization header"})
        if path == "/api/repos/create":
            req = json.loads(body)
            repo = f"{req['organization']}/{req['name']}"
            d = repo_dir(req.get("type", "model") + "s", repo)
            if os.path.isdir(d):
                return self.reply(409, {"error": "You already created this model repo", "url": f"{base}/{repo}"})
            os.makedirs(os.path.join(d, "commits", "0" * 40))
            with open(os.path.join(d, "commits", "0" * 40, ".gitattributes"), "w") as f:
                f.write("*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.gguf filter=lfs diff=lfs merge=lfs -text\n")
            with open(os.path.join(d, "refs.json"), "w") as f:
                json.dump({"main": "0" * 40}, f)
            with open(os.path.join(d, "meta.json"), "w") as f:
                json.dump({"private": bool(req.get("private"))}, f)
            return self.reply(200, {"url": f"{base}/{repo}"})
        m = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
        if m:
            req = json.loads(body)
            chunk = cfg.get("chunk_size", 1 << 30)
            objects = []
            for o in req["objects"]:
                oid, size = o["oid"], o["size"]
                if os.path.isfile(os.path.join(ROOT, "lfs", oid)):
                    objects.append({"oid": oid, "size": size})
                    continue
                verify = {"href": f"{base}/lfs-verify/{oid}", "header": {}}
                if size > chunk:
                    n = (size + chunk - 1) // chunk
                    header = {"chunk_size": str(chunk), **{"%05d" % i: f"{base}/lfs-part/{oid}/{i}" for i in range(1, n + 1)}}
                    upload = {"href": f"{base}/lfs-complete/{oid}", "header": header}
                else:
                    upload = {"href": f"{base}/lfs-upload/{oid}", "header": {}}
                objects.append({"oid": oid, "size": size, "actions": {"upload": upload, "verify": verify}})
            return self.reply(200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit|branch)/(.+)", path)
        if not m:
            return self.reply(404, {"error": "no such endpoint"})
        repo, action, rev = m.groups()
        refs = read_refs("models", repo)
        if refs is None:
            return self.reply(404, {"error": "Repository not found"}, error_code="RepoNotFound")
        if action == "branch":
            if rev in refs:
                return self.reply(409, {"error": "branch exists"})
            refs[rev] = refs["main"]
            with open(os.path.join(repo_dir("models", repo), "refs.json"), "w") as f:
                json.dump(refs, f)
            return self.reply(200, {})
        if rev not in refs:
            return self.reply(404, {"error": "Revision not found"}, error_code="RevisionNotFound")
        if action == "preupload":
            req = json.loads(body)
            threshold = cfg.get("lfs_threshold", 10 * 1024 * 1024)
            modes = [{"path": f["path"], "uploadMode": "lfs" if f["size"] >= threshold else "regular", "shouldIgnore": False}
                     for f in req["files"]]
            return self.reply(200, {"files": modes, "commitOid": refs[rev]})
        return self.commit(repo, rev, refs, body, base)

    def commit(self, repo, rev, refs, body, base):
        if self.headers.get("Content-Type") != "application/x-ndjson":
            return self.reply(400, {"error": "the commit payload is NDJSON"})
        lines = [json.loads(l) for l in body.decode().splitlines() if l.strip()]
        if not lines or lines[0].get("key") != "header":
            return self.reply(400, {"error": "the first line must be the header"})
        parent = refs[rev]
        src = os.path.join(repo_dir("models", repo), "commits", parent)
        files = {f: open(os.path.join(src, f), "rb").read() for f in files_of("models", repo, parent)}
        kinds = {}
        for line in lines[1:]:
            v = line["value"]
            if line["key"] == "file":
                if v.get("encoding") != "base64":
                    return self.reply(400, {"error": "file content must be base64"})
                files[v["path"]] = base64.b64decode(v["content"])
                kinds[v["path"]] = "regular"
            elif line["key"] == "lfsFile":
                obj = os.path.join(ROOT, "lfs", v["oid"])
                if v.get("algo") != "sha256" or not os.path.isfile(obj) or os.path.getsize(obj) != v["size"]:
                    return self.reply(400, {"error": f"{v['path']}: LFS object {v['oid']} was not uploaded"})
                files[v["path"]] = open(obj, "rb").read()
                kinds[v["path"]] = "lfs"
            else:
                return self.reply(400, {"error": f"unknown operation {line['key']}"})
        h = hashlib.sha1(parent.encode())
        for name in sorted(files):
            h.update(name.encode() + b"\0" + sha256(files[name]).encode())
        commit = h.hexdigest()
        dst = os.path.join(repo_dir("models", repo), "commits", commit)
        for name, data in files.items():
            os.makedirs(os.path.dirname(os.path.join(dst, name)), exist_ok=True)
            with open(os.path.join(dst, name), "wb") as f:
                f.write(data)
        refs[rev] = commit
        with open(os.path.join(repo_dir("models", repo), "refs.json"), "w") as f:
            json.dump(refs, f)
        with open(os.path.join(repo_dir("models", repo), "commits.jsonl"), "a") as f:
            f.write(json.dumps({"commit": commit, "revision": rev, "summary": lines[0]["value"].get("summary"), "files": kinds}) + "\n")
        self.reply(200, {"commitUrl": f"{base}/{repo}/commit/{commit}", "commitOid": commit})


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # The connections cut on purpose ("cut_once") end in these; anything else is reported.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


if __name__ == "__main__":
    server = Server(("127.0.0.1", 0), Hub)
    print(f"port {server.server_address[1]}", flush=True)
    server.serve_forever()
