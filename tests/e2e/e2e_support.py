"""Helpers for the end-to-end tests: a real vlm-server process and nv-ingest-shaped payloads."""

import base64
import io
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "server" / "assets" / "tiny"
SERVED_NAME = "nvidia/nemotron-nano-12b-v2-vl"


def _server_binary() -> Path:
    env = os.environ.get("VLM_SERVER_BIN")
    if env:
        return Path(env)
    for profile in ("release", "debug"):
        candidate = REPO / "target" / profile / "vlm-server"
        if candidate.exists():
            return candidate
    pytest.fail("vlm-server binary not found: run `cargo build --release -p vlm-server`")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, extra_args=(), env=None):
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.chat_url = f"{self.base}/v1/chat/completions"
        args = [
            str(_server_binary()),
            "serve",
            str(MODEL_DIR),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *extra_args,
        ]
        self.log = open(REPO / "target" / f"e2e-server-{self.port}.log", "w")
        self.proc = subprocess.Popen(
            args, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        self._wait_ready()

    def _wait_ready(self, timeout=120.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vlm-server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if requests.get(f"{self.base}/v1/health/ready", timeout=1).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        raise RuntimeError("vlm-server did not become ready in time")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def png_base64(width=96, height=64, seed=0) -> str:
    """A small RGB PNG with structure (gradient + block), base64-encoded."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height))
    px = img.load()
    for y in range(height):
        for x in range(width):
            px[x, y] = ((x * 255) // width, (y * 255) // height, (seed * 53) % 256)
    ImageDraw.Draw(img).rectangle([width // 4, height // 4, width // 2, height // 2], fill=(255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def nv_ingest_payload(b64: str, **overrides) -> dict:
    """The request body nv-ingest 26.3 sends, byte for byte (nv-ingest-contract.md §4)."""
    payload = {
        "model": SERVED_NAME,
        "messages": [
            {"role": "system", "content": "/no_think"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Caption the content of this image:"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}},
                ],
            },
        ],
        "max_tokens": 512,
        "temperature": 1.0,
        "top_p": 1.0,
        "stream": False,
    }
    payload.update(overrides)
    return payload
