"""A loopback stand-in for an MLflow tracking server, for tests/tracking.rs.

    python3 tests/mlflow_server.py RECORD.jsonl

Answers the REST calls ftx makes (experiments/get-by-name, experiments/create, runs/create,
runs/log-batch, runs/update) as MLflow 2.x does, keeps runs in memory, and appends every request
(method, path, query, Authorization header, JSON body) to RECORD.jsonl. Prints its port on the
first line of stdout, then serves until killed.
"""
import json
import sys
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

RECORD = sys.argv[1]
EXPERIMENTS = {"Default": "0"}
RUNS = {}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def handle_call(self, method):
        url = urlparse(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        with open(RECORD, "a") as f:
            f.write(json.dumps({"method": method, "path": url.path, "query": query,
                                "authorization": self.headers.get("Authorization"), "body": body}) + "\n")
        api = url.path.removeprefix("/api/2.0/mlflow/")
        if api == "experiments/get-by-name":
            name = query.get("experiment_name")
            if name not in EXPERIMENTS:
                return self.answer(404, {"error_code": "RESOURCE_DOES_NOT_EXIST",
                                         "message": f"Could not find experiment with name '{name}'"})
            return self.answer(200, {"experiment": {"experiment_id": EXPERIMENTS[name], "name": name}})
        if api == "experiments/create":
            EXPERIMENTS[body["name"]] = str(len(EXPERIMENTS))
            return self.answer(200, {"experiment_id": EXPERIMENTS[body["name"]]})
        if api == "runs/create":
            run_id = uuid.uuid4().hex
            RUNS[run_id] = "RUNNING"
            return self.answer(200, {"run": {"info": {"run_id": run_id, "experiment_id": body["experiment_id"], "status": "RUNNING"}}})
        if api in ("runs/log-batch", "runs/update"):
            if body.get("run_id") not in RUNS:
                return self.answer(404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no such run"})
            if api == "runs/update":
                RUNS[body["run_id"]] = body["status"]
                return self.answer(200, {"run_info": {"run_id": body["run_id"], "status": body["status"]}})
            return self.answer(200, {})
        self.answer(404, {"error_code": "ENDPOINT_NOT_FOUND", "message": api})

    def do_GET(self):
        self.handle_call("GET")

    def do_POST(self):
        self.handle_call("POST")


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
