"""The data folder (DTPLIB_DATA) and `make lab`: a real JupyterLab server on 127.0.0.1 with the project's kernel,
driven over its REST API and a kernel websocket (about 15 s)."""

import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest
import torch
import websocket  # websocket-client, a dependency of jupyter_server

from dtplib.common.cli import stop_process
from dtplib.common.images import load_photos
from dtplib.common.paths import REPO_ROOT, data_path, data_root

KERNEL = re.search(r"^KERNEL := (\S+)$", (REPO_ROOT / "Makefile").read_text(), re.M).group(1)  # what make lab uses
NOTEBOOKS = sorted(p.name for p in (REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.fixture
def data_copy(tmp_path: Path) -> Path:
    """A data folder elsewhere holding one data set of the real one (a symlink to flickr8k/)."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "flickr8k").symlink_to(data_root() / "flickr8k", target_is_directory=True)
    return folder


@pytest.mark.slow
def test_dtplib_data_redirects_the_data_folder(data_copy: Path, monkeypatch):
    monkeypatch.delenv("DTPLIB_DATA", raising=False)
    assert data_root() == REPO_ROOT.parent / "shared" / "data"
    monkeypatch.setenv("DTPLIB_DATA", str(data_copy))  # read at call time, not at import
    assert data_root() == data_copy
    images = data_path("$DTPLIB_DATA/flickr8k/images")
    assert images == data_path("${DTPLIB_DATA}/flickr8k/images") == data_copy / "flickr8k" / "images"
    batch, files = load_photos(images, 2, lambda image: torch.zeros(3, 4, 4))
    assert batch.shape == (2, 3, 4, 4) and all(f.parent == images for f in files)
    assert data_path("data/sample") == REPO_ROOT / "data" / "sample"  # other relative paths: the repository root
    monkeypatch.setenv("DTPLIB_DATA", "elsewhere/data")  # a relative value is taken from the repository root
    assert data_root() == REPO_ROOT / "elsewhere" / "data"
    # module constants (measure.bench.FLICKR, figures.viz.COCO_MINI) follow a DTPLIB_DATA set before dtplib is imported
    code = "from dtplib.measure import bench; from dtplib.figures import viz; print(bench.FLICKR); print(viz.COCO_MINI)"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "DTPLIB_DATA": str(data_copy)},
                         capture_output=True, text=True, check=True, timeout=120).stdout.split()
    assert out == [str(data_copy / "flickr8k"), str(data_copy / "coco-mini")]


def test_make_lab_leaves_the_hub_online_and_the_tests_offline(tmp_path: Path):
    """HF_HUB_OFFLINE is exported for the test and demo targets only: a user's own pretrained= works in make lab. The
    recipes run against a stand-in .venv whose jupyter and python print the variable (install itself not remade)."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    for tool in ("jupyter", "python"):
        (venv / "bin" / tool).write_text('#!/bin/sh\necho "HF_HUB_OFFLINE=${HF_HUB_OFFLINE-unset}"\n')
        (venv / "bin" / tool).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    seen = {target: subprocess.run(["make", "--no-print-directory", "-s", "-o", "install", target, f"VENV={venv}"],
                                   cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True,
                                   timeout=60).stdout.strip().splitlines()[-1] for target in ("lab", "demo")}
    assert seen == {"lab": "HF_HUB_OFFLINE=unset", "demo": "HF_HUB_OFFLINE=1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url: str, token: str, method: str = "GET") -> tuple[int, object]:
    req = urllib.request.Request(url, method=method, headers={"Authorization": f"token {token}"},
                                 data=b"{}" if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=10) as response:
        body = response.read()
        return response.status, json.loads(body) if body else None


def execute(ws: websocket.WebSocket, code: str, timeout: float = 60) -> str:
    """Run `code` in the kernel over its channels websocket (JSON messages); its stdout."""
    msg_id = uuid.uuid4().hex
    ws.send(json.dumps({
        "header": {"msg_id": msg_id, "username": "test", "session": uuid.uuid4().hex, "msg_type": "execute_request",
                   "version": "5.3", "date": ""},
        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
        "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                    "allow_stdin": False, "stop_on_error": True},
    }))
    stdout, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = json.loads(ws.recv())
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream" and content["name"] == "stdout":
            stdout.append(content["text"])
        elif kind == "error":
            raise AssertionError("kernel error: " + "\n".join(content["traceback"]))
        elif kind == "status" and content["execution_state"] == "idle":
            return "".join(stdout)
    raise TimeoutError(f"no reply from the kernel in {timeout} s")


@pytest.mark.slow
def test_make_lab_serves_the_notebooks_and_runs_the_project_kernel(tmp_path: Path, data_copy: Path):
    # the kernelspec make lab installs into .venv, installed the same way into a folder of this test
    prefix = tmp_path / "prefix"
    subprocess.run([sys.executable, "-m", "ipykernel", "install", "--prefix", str(prefix), "--name", KERNEL],
                   check=True, capture_output=True, timeout=60)
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, "DTPLIB_DATA": str(data_copy), "JUPYTER_PATH": str(prefix / "share" / "jupyter"),
           "JUPYTER_CONFIG_DIR": str(tmp_path / "config"), "JUPYTER_DATA_DIR": str(tmp_path / "jupyter-data"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "IPYTHONDIR": str(tmp_path / "ipython")}
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--ServerApp.root_dir={REPO_ROOT}",
               f"--MappingKernelManager.default_kernel_name={KERNEL}",
               "--MappingKernelManager.transport_encryption=auto", f"--IdentityProvider.token={token}"]
    command += ["--allow-root"] if os.geteuid() == 0 else []  # as make lab does
    makefile = (REPO_ROOT / "Makefile").read_text()
    for flag in command[3:]:  # the flags of make lab's command, but the port's and the token's values
        assert flag.startswith(("--IdentityProvider", "--ServerApp.port_retries")) or flag.split("=")[0] in makefile
    base, log = f"http://127.0.0.1:{port}", tmp_path / "lab.log"
    start = time.monotonic()
    with open(log, "w") as log_file:
        server = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    children = []
    try:
        while True:  # the server is up once its contents API answers
            assert server.poll() is None, f"jupyter lab exited with {server.returncode}:\n{log.read_text()}"
            assert time.monotonic() - start < 45, f"jupyter lab did not answer in 45 s:\n{log.read_text()}"
            try:
                status, listing = request(f"{base}/api/contents/notebooks", token)
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.25)
        assert status == 200 and listing["type"] == "directory"
        listed = sorted(item["name"] for item in listing["content"] if re.fullmatch(r"\d\d_\w+\.ipynb", item["name"]))
        assert listed == NOTEBOOKS and [name[:2] for name in listed] == ["01", "02", "03", "04", "05", "06"], listed
        with pytest.raises(urllib.error.HTTPError):  # the token is needed
            request(f"{base}/api/contents/notebooks", "wrong")

        status, kernel = request(f"{base}/api/kernels?name={KERNEL}", token, "POST")
        assert status == 201 and kernel["name"] == KERNEL
        children = psutil.Process(server.pid).children(recursive=True)
        ws = websocket.create_connection(f"ws://127.0.0.1:{port}/api/kernels/{kernel['id']}/channels",
                                         header=[f"Authorization: token {token}"], timeout=60)
        try:
            out = execute(ws, "import sys, dtplib, dtplib.common.paths\n"
                              "print(dtplib.__file__); print(sys.prefix); print(dtplib.common.paths.data_root())")
        finally:
            ws.close()
        assert out.split("\n")[:3] == [str(REPO_ROOT / "dtplib" / "__init__.py"), sys.prefix, str(data_copy)]
        status, _ = request(f"{base}/api/kernels/{kernel['id']}", token, "DELETE")
        assert status == 204
        status, kernels = request(f"{base}/api/kernels", token)
        assert kernels == []
    finally:
        stop_process(server, timeout=20)
        _, alive = psutil.wait_procs([c for c in children if c.is_running()], timeout=10)
        for child in alive:  # a kernel the server left behind
            child.kill()
    text = log.read_text()
    assert "without encryption" not in text, text  # make lab provisions CurveZMQ keys for its kernels
    assert not alive
