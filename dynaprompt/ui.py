"""`dynaprompt ui`: MLflow's UI on the project's database, opening on the experiment's runs from every path.

MLflow 3.17's UI opens every experiment in its GenAI view ("Overview", "Traces 0") unless the link says
`workflowType=machine_learning` or the browser once chose "Model training": it ignores the experiment's
`mlflow.experimentKind` tag, and neither `mlflow ui` nor its frontend has a setting for a landing page or a default
experiment. So `mlflow ui` runs on an internal loopback port behind a small front on the user's port, which passes
every request through unchanged except the app's page: MLflow serves the same index.html for every route (the
route is the URL's fragment, after `#`), and the front puts one inline script first in its <head>, which runs
before the app's (deferred) script on every route. It

- stores "Model training" as the browser's chosen workflow, where the browser has not chosen one yet, exactly as
  MLflow's own switch stores it, so an experiment's link (`/#/experiments/<id>`, the one a colleague pastes) and a
  click in MLflow's experiments list open on the runs table; a browser that chose a workflow keeps its choice;
- gives a URL without a route (`http://host:port/`) the experiment's runs route.

A status-code redirect cannot do either: the fragment never reaches a server, so `/` would loop, or every link
into the app (`/#/compare-runs?...`) would be sent to the runs as well.

No mlflow import here (the library stays free of it): the server is the `mlflow` CLI in a subprocess and the
experiment's id is read from the sqlite file.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# headers that belong to one connection, not to the message (RFC 9110 7.6.1), never forwarded
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
              "trailer", "transfer-encoding", "upgrade"}

# where MLflow's frontend keeps the workflow chosen with its sidebar switch, and the value for "Model training":
# WorkflowTypeProvider (mlflow 3.17.2, server/js/build/static/js/main.*.js, module 7975) reads it with its
# useLocalStorage hook (module 51653), which stores JSON.stringify(value) under `${key}_v${version}`, here key
# "mlflow.workflowType", version 1; absent, the workflow is "genai". A `workflowType` URL parameter overrides it.
WORKFLOW_STORAGE_KEY = "mlflow.workflowType_v1"
MODEL_TRAINING_WORKFLOW = "machine_learning"


def experiment_id(db_file: Path, name: str) -> str:
    """The id of experiment `name` in an MLflow sqlite database (the active one, if a deleted one shares it)."""
    db_file = Path(db_file)
    if not db_file.is_file():
        raise FileNotFoundError(f"no MLflow database at {db_file}: the sweep creates it (dvc repro)")
    try:
        with sqlite3.connect(f"{db_file.resolve().as_uri()}?mode=ro", uri=True) as connection:
            rows = connection.execute("SELECT experiment_id, lifecycle_stage FROM experiments WHERE name = ?",
                                      (name,)).fetchall()
    except sqlite3.DatabaseError as error:
        raise ValueError(f"{db_file} is not an MLflow database ({error})") from None
    active = [str(i) for i, stage in rows if stage == "active"]
    if not active:
        state = "only a deleted one" if rows else "none"
        raise ValueError(f"no experiment {name!r} in {db_file} ({state}): the sweep logs it (dvc repro)")
    return active[0]


def runs_route(experiment: str) -> str:
    """The experiment's runs in MLflow's model-training view: the part of the UI's URL after its origin's `/`."""
    return f"#/experiments/{experiment}/runs?workflowType=machine_learning"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def mlflow_command(db_file: Path, artifacts: Path, port: int) -> list[str]:
    """`mlflow ui` on the database, loopback only (the front is what the user reaches)."""
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", f"sqlite:///{Path(db_file).resolve()}",
            "--default-artifact-root", Path(artifacts).resolve().as_uri(),
            "--artifacts-destination", str(Path(artifacts).resolve()),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--uvicorn-opts", "--no-access-log"]


def mlflow_environment() -> dict:
    """The environment for `mlflow ui`: its job runners (six huey consumers, ~250 MB each, for GenAI scorers and
    prompt optimisation) stay off unless MLFLOW_SERVER_ENABLE_JOB_EXECUTION says otherwise."""
    return {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION",
                                                                             "false")}


def landing_script(route: str) -> bytes:
    """An inline script for MLflow's index.html, run on every route before the app: a browser that never chose a
    workflow gets "Model training" (kept, so MLflow's own links from then on open an experiment on its runs), and a
    page opened without a route (the root URL) gets `route`. Storage may be refused (a locked-down profile): the
    route still is set."""
    remember = (f"try{{if(localStorage.getItem({json.dumps(WORKFLOW_STORAGE_KEY)})===null)"
                f"localStorage.setItem({json.dumps(WORKFLOW_STORAGE_KEY)},"
                f"{json.dumps(json.dumps(MODEL_TRAINING_WORKFLOW))});}}catch(e){{}}")
    return (f'<script>(function(){{{remember}var h=location.hash;if(!h||h==="#"||h==="#/")history.replaceState('
            f'null,"",location.pathname+location.search+{json.dumps(route)});}})();</script>').encode()


def with_landing(page: bytes, route: str) -> bytes:
    """MLflow's index.html with the landing script first in <head>, before the app's (deferred) script reads the
    route; unchanged when there is no <head> to put it in."""
    head = re.search(rb"<head[^>]*>", page, re.IGNORECASE)
    return page if head is None else page[: head.end()] + landing_script(route) + page[head.end():]


class Front(BaseHTTPRequestHandler):
    """Every request passed to the upstream server as it came; the app's page (`/`, whatever the route after `#`)
    gains the landing script.

    The route after `#` never reaches a server, so `/` cannot be redirected by status code without also
    redirecting every link into the app (`/#/compare-runs?...`): the script sends only a URL without a route on,
    and leaves every other route to the app, with "Model training" as the workflow a fresh browser starts in.
    """

    upstream: tuple[str, int] = ("127.0.0.1", 0)
    route: str = "#/"  # where the root URL lands
    server_version = "dynaprompt-ui"

    def do_GET(self):
        self.forward()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    def request_body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else None

    def forward(self) -> None:
        app_page = self.command == "GET" and self.path.split("?", 1)[0] == "/"
        body = self.request_body()
        upstream = http.client.HTTPConnection(*self.upstream, timeout=600)
        try:
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for key, value in self.headers.items():
                lower = key.lower()
                if lower not in HOP_BY_HOP and lower != "content-length" and not (
                        app_page and lower in ("accept-encoding", "if-none-match", "if-modified-since")):
                    upstream.putheader(key, value)
            if body is not None:
                upstream.putheader("Content-Length", str(len(body)))
            upstream.endheaders(body)
            response = upstream.getresponse()
        except OSError as error:
            upstream.close()
            self.send_error(502, f"mlflow ui on port {self.upstream[1]} did not answer ({error})")
            return
        try:
            headers = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP]
            page = None
            if app_page and response.status == 200 and "html" in response.getheader("Content-Type", ""):
                page = with_landing(response.read(), self.route)
                stale = {"content-length", "etag", "last-modified", "cache-control", "expires"}
                headers = [(k, v) for k, v in headers if k.lower() not in stale]
                headers += [("Content-Length", str(len(page))), ("Cache-Control", "no-store")]
            self.send_response_only(response.status, response.reason)
            for key, value in headers:
                self.send_header(key, value)
            self.send_header("Connection", "close")  # a body without a length runs to the end of the connection
            self.end_headers()
            if page is not None:
                self.wfile.write(page)
            elif self.command != "HEAD":
                while chunk := response.read1(65536):
                    self.wfile.write(chunk)
                    self.wfile.flush()
        except OSError:  # the browser went away
            pass
        finally:
            upstream.close()
            self.close_connection = True

    def log_message(self, format, *args):  # noqa: A002 (BaseHTTPRequestHandler's signature)
        pass


class MlflowUi:
    """`mlflow ui` on an internal port behind the front on (host, port); `start()` returns once it answers."""

    def __init__(self, db_file: Path, artifacts: Path, experiment: str, host: str = "127.0.0.1", port: int = 5000,
                 command=mlflow_command, cwd: Path | None = None, log_dir: Path | None = None):
        self.db_file, self.artifacts, self.experiment = Path(db_file), Path(artifacts), experiment
        self.host, self.port, self.command, self.cwd = host, port, command, cwd
        self.log_dir = Path(log_dir or tempfile.gettempdir())  # mlflow's output (removed after a clean stop)
        self.process: subprocess.Popen | None = None
        self.front: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None
        self.log_file: Path | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else "[::1]" if self.host == "::" else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 120.0) -> str:
        """Bind the front, start mlflow, wait for its /health; returns the runs view URL."""
        experiment = experiment_id(self.db_file, self.experiment)
        handler = type("Front", (Front,), {"route": runs_route(experiment)})
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        server = type("FrontServer", (ThreadingHTTPServer,), {"address_family": family, "daemon_threads": True})
        try:
            self.front = server((self.host, self.port), handler)  # first: a busy port fails at once
        except OSError as error:
            raise RuntimeError(f"cannot listen on {self.host}:{self.port} ({error.strerror or error})") from None
        self.port = self.front.server_address[1]
        internal = free_port()
        handler.upstream = ("127.0.0.1", internal)
        self.log_file = self.log_dir / f"dynaprompt-ui-{self.port}.log"
        with open(self.log_file, "wb") as log:
            self.process = subprocess.Popen(self.command(self.db_file, self.artifacts, internal), cwd=self.cwd,
                                            env=mlflow_environment(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.healthy(internal):
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow ui exited with code {self.process.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow ui did not answer within {timeout:.0f} s (log: {self.log_file})")
            time.sleep(0.5)
        self.thread = threading.Thread(target=self.front.serve_forever, name="dynaprompt-ui-front", daemon=True)
        self.thread.start()
        return f"{self.url}/{runs_route(experiment)}"

    @staticmethod
    def healthy(port: int) -> bool:
        """Whether mlflow answers /health (asked directly: no proxy from the environment in between)."""
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            connection.request("GET", "/health")
            return connection.getresponse().status == 200
        except OSError:
            return False
        finally:
            connection.close()

    def log_tail(self, lines: int = 5) -> str:
        text = self.log_file.read_text(errors="replace").strip().splitlines() if self.log_file else []
        return " | ".join(text[-lines:]) or "no output"

    def wait(self) -> int:
        """Block until mlflow exits (it should not: Ctrl-C or SIGTERM stop both); its exit code."""
        return self.process.wait()

    def close(self) -> None:
        """Stop the front and mlflow (its whole process group: the uvicorn workers too)."""
        started = self.thread is not None
        if started:
            self.front.shutdown()  # returns once serve_forever has
            self.thread = None
        if self.front is not None:
            self.front.server_close()
            self.front = None
        if self.process is not None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.process.pid, sig)  # also the uvicorn workers, should mlflow have gone first
                except ProcessLookupError:
                    break
                try:
                    self.process.wait(timeout=30)
                    break
                except subprocess.TimeoutExpired:
                    continue
            self.process = None
        if started and self.log_file is not None:  # a failed start's log stays, for its error message
            self.log_file.unlink(missing_ok=True)
