#!/usr/bin/env python3
"""The official `openai` Python client, unchanged, against `chatforge serve`: a plain reply, a
streamed reply that matches it, a stop sequence, the completions endpoint, log-probabilities
(streamed too), n choices, and errors raised as the client's own exception types. Exits non-zero on the first mismatch.

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

# Log-probabilities, parsed into the client's own types; the streamed ones are the same.
lp = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0,
                                    logprobs=True, top_logprobs=2)
content = lp.choices[0].logprobs.content
assert len(content) == lp.usage.completion_tokens, (len(content), lp.usage)
spelled = bytes(b for t in content for b in t.bytes).decode("utf-8", "replace")
assert spelled == lp.choices[0].message.content, (spelled, lp.choices[0].message.content)
assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
print("logprobs:", [(t.token, round(t.logprob, 3)) for t in content[:4]])
streamed = []
for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0,
                                            logprobs=True, top_logprobs=2, stream=True):
    if chunk.choices and chunk.choices[0].logprobs is not None:
        streamed.extend((t.token, t.logprob) for t in chunk.choices[0].logprobs.content)
assert streamed == [(t.token, t.logprob) for t in content], streamed

many = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0.8, seed=3, n=2)
assert [c.index for c in many.choices] == [0, 1], many.choices
print("n=2:", [c.message.content for c in many.choices])

scored = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0, logprobs=2)
token_logprobs = scored.choices[0].logprobs.token_logprobs
assert len(token_logprobs) == scored.usage.completion_tokens, scored
assert "".join(scored.choices[0].logprobs.tokens) == scored.choices[0].text
print("completion logprobs sum:", sum(token_logprobs))

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
