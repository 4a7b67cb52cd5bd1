#!/usr/bin/env python3
"""The official `openai` Python client, unchanged, against `chatforge serve`: a plain reply, a
streamed reply that matches it, a stop sequence, the completions endpoint, and errors raised as the
client's own exception types. Exits non-zero on the first mismatch.

usage: openai_client.py BASE_URL API_KEY
"""
import sys

import openai

base_url, api_key = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key=api_key)

models = client.models.list()
model = models.data[0].id
print("model:", model)

messages = [{"role": "user", "content": "the cat sat on the mat"}]
plain = client.chat.completions.create(model=model, messages=messages, max_tokens=30, temperature=0.8, seed=11)
text = plain.choices[0].message.content
assert plain.object == "chat.completion", plain
assert plain.choices[0].message.role == "assistant"
assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
print("plain:", repr(text), plain.choices[0].finish_reason)

stream = client.chat.completions.create(model=model, messages=messages, max_tokens=30, temperature=0.8, seed=11,
                                        stream=True, stream_options={"include_usage": True})
pieces, ids, finish, usage = [], set(), None, None
for chunk in stream:
    ids.add(chunk.id)
    if chunk.usage is not None:
        usage = chunk.usage
    if chunk.choices:
        delta = chunk.choices[0].delta
        if delta.content:
            pieces.append(delta.content)
        if chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
streamed = "".join(pieces)
print("streamed:", repr(streamed), finish)
assert len(ids) == 1, ids
assert streamed == text, (streamed, text)
assert finish == plain.choices[0].finish_reason
assert usage is not None and usage.completion_tokens == plain.usage.completion_tokens

# A stop sequence taken from the middle of the plain reply ends the reply before it.
stop = text[len(text) // 2:len(text) // 2 + 2]
if stop.strip():
    cut = client.chat.completions.create(model=model, messages=messages, max_tokens=30, temperature=0.8, seed=11,
                                         stop=[stop])
    got = cut.choices[0].message.content
    print("with stop", repr(stop) + ":", repr(got))
    assert stop not in got and text.startswith(got), (got, text)
    assert cut.choices[0].finish_reason == "stop"

completion = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0)
print("completion:", repr(completion.choices[0].text))
assert completion.usage.completion_tokens <= 8

try:
    client.chat.completions.create(model="no-such-model", messages=messages)
    sys.exit("an unknown model was accepted")
except openai.NotFoundError as e:
    print("unknown model ->", e.status_code)
try:
    openai.OpenAI(base_url=base_url, api_key="wrong").models.list()
    sys.exit("a wrong API key was accepted")
except openai.AuthenticationError as e:
    print("wrong key ->", e.status_code)
try:
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "cat " * 2000}])
    sys.exit("a prompt over the context was accepted")
except openai.BadRequestError as e:
    print("too long ->", e.status_code, e.body["message"] if isinstance(e.body, dict) else e.body)
print("openai client: all checks passed")
