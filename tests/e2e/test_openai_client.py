"""The official `openai` Python client against vlm-server."""

import openai
import pytest

from e2e_support import SERVED_NAME, png_base64


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key="anything", max_retries=0)


def _messages(b64):
    return [
        {"role": "system", "content": "/no_think"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Caption the content of this image:"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}},
            ],
        },
    ]


def test_models_list_names_the_served_model(client):
    ids = [m.id for m in client.models.list()]
    assert ids == [SERVED_NAME]


def test_chat_completion(client):
    completion = client.chat.completions.create(
        model=SERVED_NAME, messages=_messages(png_base64()), max_tokens=16, temperature=0
    )
    assert len(completion.choices) == 1
    assert completion.choices[0].message.content
    assert completion.usage.completion_tokens <= 16


def test_streaming_matches_non_streaming(client):
    kwargs = dict(model=SERVED_NAME, messages=_messages(png_base64(seed=3)), max_tokens=20, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    stream = client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert text == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_text_only_prompt(client):
    completion = client.chat.completions.create(
        model=SERVED_NAME, messages=[{"role": "user", "content": "Hello there /no_think"}], max_tokens=8, temperature=0
    )
    assert completion.choices[0].message.content


def test_wrong_model_is_404(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=_messages(png_base64()), max_tokens=4)


def test_bad_image_is_400(client):
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.chat.completions.create(model=SERVED_NAME, messages=_messages("bm90IGFuIGltYWdl"), max_tokens=4)
    assert excinfo.value.body["message"]
