#!/usr/bin/env python3
"""The official `openai` client asks `chatforge serve --index` questions whose answers are in the
user's own file (wiki_demo.txt) and that the model gets wrong without it: each answer must hold the
fact, and the reply's `sources` must name the file and the line of the article it comes from, in a
plain and a streamed reply. Exits non-zero on the first mismatch.

usage: openai_retrieval.py BASE_URL
"""
import sys

import openai

client = openai.OpenAI(base_url=sys.argv[1], api_key="none")
model = client.models.list().data[0].id

# (question, the fact the answer must hold, the article's line in wiki_demo.txt)
QUESTIONS = [
    ("When was Alain Connes born?", "1947", 17),
    ("When did Alice O'Connor die?", "1982", 16),
    ("In what year was Actresses (Actrius) made?", "1997", 12),
]

for question, fact, line in QUESTIONS:
    messages = [{"role": "user", "content": question}]
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=40, temperature=0)
    text = reply.choices[0].message.content
    sources = (reply.model_extra or {}).get("sources") or []
    names = [f"{s['file'].rsplit('/', 1)[-1]}:{s['line']}" for s in sources]
    print(f"{question!r} -> {text!r} sources {names}")
    assert fact in text, f"{fact} not in {text!r}"
    assert f"wiki_demo.txt:{line}" in names, f"line {line} not among the sources {names}"

    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=40, temperature=0, stream=True)
    pieces, streamed_sources = [], None
    for chunk in stream:
        extra = chunk.model_extra or {}
        if "sources" in extra:
            streamed_sources = extra["sources"]
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    assert "".join(pieces) == text, ("".join(pieces), text)
    assert streamed_sources == sources, "the stream's sources differ from the reply's"

print("all checks passed")
