#!/usr/bin/env python3
"""A tool-call round trip through the official `openai` client against `chatforge serve`: the
model is made to call `get_weather` (tool_choice "required"), the call comes back in the client's
own types, streamed too; the tool's result goes back as a `tool` message and the model answers in
text. Exits non-zero on the first mismatch.

usage: openai_tools.py BASE_URL
"""
import json
import sys

import openai

client = openai.OpenAI(base_url=sys.argv[1], api_key="none")
model = client.models.list().data[0].id
tools = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
messages = [{"role": "user", "content": "What is the weather in Paris?"}]

first = client.chat.completions.create(model=model, messages=messages, tools=tools, tool_choice="required",
                                       temperature=0, max_tokens=60)
choice = first.choices[0]
assert choice.finish_reason == "tool_calls", choice
call = choice.message.tool_calls[0]
arguments = json.loads(call.function.arguments)
print("call:", call.function.name, arguments)
assert call.function.name == "get_weather"
assert "paris" in arguments["city"].lower(), arguments

# The same call, streamed as a tool_calls delta.
streamed, finish = {}, None
for chunk in client.chat.completions.create(model=model, messages=messages, tools=tools, tool_choice="required",
                                            temperature=0, max_tokens=60, stream=True):
    if not chunk.choices:
        continue
    for d in chunk.choices[0].delta.tool_calls or []:
        entry = streamed.setdefault(d.index, {"name": "", "arguments": ""})
        entry["name"] += d.function.name or ""
        entry["arguments"] += d.function.arguments or ""
    finish = chunk.choices[0].finish_reason or finish
assert finish == "tool_calls", finish
assert streamed[0] == {"name": call.function.name, "arguments": call.function.arguments}, streamed

# The result goes back; the model answers in text.
messages += [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
             {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"celsius": 22, "sky": "sunny"})}]
answer = client.chat.completions.create(model=model, messages=messages, tools=tools, tool_choice="none",
                                        temperature=0, max_tokens=60)
text = answer.choices[0].message.content
print("answer:", repr(text))
assert answer.choices[0].message.tool_calls is None and text and text.strip(), answer
print("tools: all checks passed")
