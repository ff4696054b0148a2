"""The error table and 64 concurrent clients, against the real server and model."""

import base64
import concurrent.futures

import pytest
import requests

from e2e_support import nv_ingest_payload, png_base64


def _image_part(url):
    return {"type": "image_url", "image_url": {"url": url}}


def _with_parts(parts, **overrides):
    payload = nv_ingest_payload(png_base64(), **overrides)
    payload["messages"][1]["content"] = [{"type": "text", "text": "Caption:"}, *parts]
    return payload


CASES = [
    ("malformed JSON", b'{"model": "nvidia/nemotron-nano-12b-v2-vl", "messages": [', 400),
    ("messages is a number", {"model": "nvidia/nemotron-nano-12b-v2-vl", "messages": 5}, 400),
    ("max_tokens is a string", nv_ingest_payload(png_base64(), max_tokens="x"), 400),
    ("bad base64", _with_parts([_image_part("data:image/png;base64,@@@not-base64@@@")]), 400),
    ("not an image", _with_parts([_image_part("data:image/png;base64," + base64.b64encode(b"hello").decode())]), 400),
    ("zero-byte image", _with_parts([_image_part("data:image/png;base64,")]), 400),
    ("too small image", _with_parts([_image_part("data:image/png;base64," + png_base64(16, 16))]), 400),
    ("five images", _with_parts([_image_part("data:image/png;base64," + png_base64())] * 5), 400),
    ("remote URL", _with_parts([_image_part("http://example.com/cat.png")]), 400),
    ("wrong model", nv_ingest_payload(png_base64(), model="gpt-4o"), 404),
    ("n = 2", nv_ingest_payload(png_base64(), n=2), 400),
]


@pytest.mark.parametrize("name,body,status", CASES, ids=[c[0] for c in CASES])
def test_error_table(server, name, body, status):
    if isinstance(body, bytes):
        response = requests.post(server.chat_url, data=body, headers={"content-type": "application/json"}, timeout=30)
    else:
        response = requests.post(server.chat_url, json=body, timeout=30)
    assert response.status_code == status, (name, response.text)
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"], name
    assert set(error) >= {"message", "type", "param", "code"}, name


def test_oversized_body_is_413(server):
    big = "A" * (33 * 1024 * 1024)  # over the 32 MiB default
    response = requests.post(server.chat_url, json=_with_parts([_image_part("data:image/png;base64," + big)]), timeout=60)
    assert response.status_code == 413, response.text[:200]
    assert response.json()["error"]["message"]


def test_sixty_four_concurrent_clients_get_their_own_answers(server):
    payloads = [nv_ingest_payload(png_base64(40 + 3 * i, 48, i), temperature=0, max_tokens=12) for i in range(64)]
    serial = [requests.post(server.chat_url, json=p, timeout=120).json()["choices"][0]["message"]["content"] for p in payloads]
    with concurrent.futures.ThreadPoolExecutor(max_workers=64) as pool:
        responses = list(pool.map(lambda p: requests.post(server.chat_url, json=p, timeout=120), payloads))
    statuses = [r.status_code for r in responses]
    # Under the default limits (16 running + 128 queued) nothing is refused.
    assert statuses == [200] * 64, statuses
    together = [r.json()["choices"][0]["message"]["content"] for r in responses]
    assert together == serial
