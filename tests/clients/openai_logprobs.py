#!/usr/bin/env python3
"""Log-probabilities through the official `openai` client against `chatforge serve`: completions
with `logprobs`, streamed and not, must report the same tokens and numbers; so must chat
completions with `logprobs` and `top_logprobs`, whose alternatives come most likely first. Prints
one JSON line per completion prompt ({"prompt", "text", "sum"}) for the caller to score with
`chatforge eval`, then "logprobs: all checks passed".

usage: openai_logprobs.py BASE_URL PROMPT...
"""
import json
import sys

import openai

client = openai.OpenAI(base_url=sys.argv[1], api_key="none")
model = client.models.list().data[0].id


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}")
        sys.exit(1)


for prompt in sys.argv[2:]:
    args = dict(model=model, prompt=prompt, max_tokens=40, temperature=0, logprobs=1)
    whole = client.completions.create(**args).choices[0]
    tokens, values = whole.logprobs.tokens, whole.logprobs.token_logprobs
    check(len(tokens) == len(values) > 0, f"{prompt!r}: {len(tokens)} tokens, {len(values)} values")
    check("".join(tokens) == whole.text, f"{prompt!r}: the tokens spell the text")
    check(all(v <= 0 for v in values), f"{prompt!r}: log-probabilities above 0: {values}")
    s_text, s_tokens, s_values = "", [], []
    for chunk in client.completions.create(stream=True, **args):
        c = chunk.choices[0]
        s_text += c.text
        if c.logprobs is not None:
            s_tokens += c.logprobs.tokens
            s_values += c.logprobs.token_logprobs
    check(s_text == whole.text, f"{prompt!r}: streamed text {s_text!r} vs {whole.text!r}")
    check(s_tokens == tokens, f"{prompt!r}: streamed tokens differ")
    check(s_values == values, f"{prompt!r}: streamed log-probabilities differ")
    print(json.dumps({"prompt": prompt, "text": whole.text, "sum": sum(values)}))

messages = [{"role": "user", "content": "Name three colours."}]
args = dict(model=model, messages=messages, max_tokens=24, temperature=0, logprobs=True,
            top_logprobs=3)
whole = client.chat.completions.create(**args).choices[0]
content = whole.logprobs.content
check(len(content) > 0, "chat: no log-probabilities")
check(b"".join(bytes(t.bytes) for t in content).decode() == whole.message.content,
      "chat: the tokens' bytes spell the reply")
for t in content:
    alternatives = [a.logprob for a in t.top_logprobs]
    check(alternatives == sorted(alternatives, reverse=True), f"chat: {alternatives} out of order")
    check(t.logprob <= alternatives[0] + 1e-6, f"chat: greedy {t.logprob} below {alternatives[0]}")
streamed = []
for chunk in client.chat.completions.create(stream=True, **args):
    c = chunk.choices[0]
    if c.logprobs is not None and c.logprobs.content:
        streamed += c.logprobs.content
check([(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content],
      "chat: streamed log-probabilities differ")
print("logprobs: all checks passed")
