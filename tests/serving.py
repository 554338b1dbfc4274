"""Helpers shared by the serving tests: a server on a free loopback port through the command
line, in-process requests to an application, and the JSON error shape every refusal has."""

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
KEY = "k-7f3a9c1e5b"
AUTH = {"Authorization": f"Bearer {KEY}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_cli(run, args: list[str], env: dict, log: Path):
    """`encdec serve RUN ARGS` on a free port, its output in ``log``; yields the base URL."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), **env)
    cmd = [sys.executable, "-m", "encdec.cli", "serve", str(run), "--port", str(port),
           "--threads", "1", *args]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            if httpx.get(base + "/v1/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"server did not start: {log.read_text()}")
        time.sleep(0.2)
    yield base
    proc.terminate()
    proc.wait(timeout=20)


def error_of(response, status):
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert err["status"] == status and err["message"]
    return err["field"]


def call(app, *requests, client=("127.0.0.1", 5000)):
    """Send (method, path, httpx keywords) requests to ``app`` at once; the responses in order."""
    async def send_all():
        transport = httpx.ASGITransport(app, client=client)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await asyncio.gather(*(http.request(m, p, **kw) for m, p, kw in requests))
    return asyncio.run(send_all())


def translate_request(inputs, headers=None):
    return ("POST", "/v1/translate", {"json": {"inputs": inputs}, "headers": headers or {}})
