"""A client that goes away must not keep the model busy (nv-ingest re-sends on timeout)."""

import json
import time

import requests

from e2e_support import nv_ingest_payload, png_base64


def test_disconnect_frees_the_only_slot(single_slot_server):
    endless = nv_ingest_payload(png_base64(), max_tokens=1_000_000, ignore_eos=True, stream=True)
    with requests.post(single_slot_server.chat_url, json=endless, stream=True, timeout=30) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith(b"data: "))
        assert json.loads(first[len(b"data: "):])["object"] == "chat.completion.chunk"
    # The stream is closed. With one slot, this request only finishes once
    # the abandoned generation has been cancelled.
    started = time.monotonic()
    response = requests.post(
        single_slot_server.chat_url, json=nv_ingest_payload(png_base64(), max_tokens=8), timeout=60
    )
    assert response.status_code == 200, response.text
    assert time.monotonic() - started < 30
    metrics = requests.get(f"{single_slot_server.base}/metrics", timeout=5).text
    assert "vlm_client_disconnects_total" in metrics
