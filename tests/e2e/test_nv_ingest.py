"""nv-ingest's own caption client (nv-ingest-api 26.3) against vlm-server."""

import concurrent.futures

import pytest
import requests
from nv_ingest_api.internal.transform.caption_image import _generate_captions

from e2e_support import SERVED_NAME, nv_ingest_payload, png_base64


def test_nv_ingest_client_captions_every_image(server):
    images = [png_base64(96, 64, 1), png_base64(200, 120, 2), png_base64(64, 64, 3), png_base64(48, 160, 4)]
    captions = _generate_captions(
        images,
        "Caption the content of this image:",
        "/no_think",
        "ngcapikey",  # nv-ingest's default key; no keys configured, so any bearer is accepted
        server.chat_url,
        SERVED_NAME,
        temperature=1.0,
    )
    assert len(captions) == len(images)
    for caption in captions:
        assert isinstance(caption, str) and caption.strip(), captions


def test_exact_wire_request_gets_one_string_choice(server):
    response = requests.post(
        server.chat_url,
        json=nv_ingest_payload(png_base64()),
        headers={"accept": "application/json", "Authorization": "Bearer ngcapikey"},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["choices"]) == 1
    choice = body["choices"][0]
    assert isinstance(choice["message"]["content"], str) and choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    # One 96x64 image on 64px tiles: 2x1 grid + thumbnail, 4 tokens each, plus text.
    assert usage["prompt_tokens"] > 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_greedy_is_deterministic(server):
    payload = nv_ingest_payload(png_base64(seed=7), temperature=0, max_tokens=24)
    first = requests.post(server.chat_url, json=payload, timeout=120).json()
    second = requests.post(server.chat_url, json=payload, timeout=120).json()
    assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]


def test_sixteen_concurrent_requests_like_nv_ingest(server):
    payloads = [nv_ingest_payload(png_base64(64 + 8 * i, 64, i), temperature=0, max_tokens=16) for i in range(16)]
    serial = [requests.post(server.chat_url, json=p, timeout=120).json() for p in payloads[:4]]
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(lambda p: requests.post(server.chat_url, json=p, timeout=120), payloads))
    assert all(r.status_code == 200 for r in results), [r.text for r in results if r.status_code != 200]
    # Concurrency must not cross responses: the first four match their serial runs.
    for alone, together in zip(serial, results[:4]):
        assert alone["choices"][0]["message"]["content"] == together.json()["choices"][0]["message"]["content"]


def test_api_keys_from_flag_and_env(keyed_server):
    for key in ("first-key", "second-key"):
        captions = _generate_captions(
            [png_base64()], "Caption the content of this image:", "/no_think", key, keyed_server.chat_url, SERVED_NAME
        )
        assert captions[0]
    # A wrong key is a 401, which nv-ingest does not retry.
    with pytest.raises(Exception) as excinfo:
        _generate_captions(
            [png_base64()], "Caption the content of this image:", "/no_think", "ngcapikey", keyed_server.chat_url, SERVED_NAME
        )
    assert "401" in str(excinfo.value)
    response = requests.post(keyed_server.chat_url, json=nv_ingest_payload(png_base64()), timeout=30)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
