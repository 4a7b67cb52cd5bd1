#!/usr/bin/env python3
"""Structured output through the official `openai` client against `chatforge serve`: 20 replies
under `response_format` json_schema (four schemas, five seeds each, sampled at temperature 0.8),
each validated against its schema with `jsonschema`; a `json_object` reply; a streamed one. Exits
non-zero on the first reply that does not validate.

usage: openai_structured.py BASE_URL
"""
import json
import sys

import jsonschema
import openai

client = openai.OpenAI(base_url=sys.argv[1], api_key="none")
model = client.models.list().data[0].id

SCHEMAS = {
    "person": ("Describe a fictional person.", {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 30},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"},
        },
        "required": ["name", "age", "email"],
        "additionalProperties": False,
    }),
    "weather": ("What is the weather like in Paris today?", {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 40},
            "sky": {"enum": ["sunny", "cloudy", "rainy", "snowy"]},
            "celsius": {"type": "number", "minimum": -50, "maximum": 50},
        },
        "required": ["city", "sky", "celsius"],
        "additionalProperties": False,
    }),
    "shopping": ("Write a short shopping list.", {
        "type": "object",
        "properties": {
            "items": {
                "type": "array", "minItems": 1, "maxItems": 4,
                "items": {
                    "type": "object",
                    "properties": {"thing": {"type": "string", "maxLength": 20},
                                   "count": {"type": "integer", "minimum": 1, "maximum": 9}},
                    "required": ["thing", "count"], "additionalProperties": False,
                },
            },
        },
        "required": ["items"],
        "additionalProperties": False,
    }),
    "answer": ("Is the sky blue? Answer with a confidence.", {
        "type": "object",
        "properties": {"yes": {"type": "boolean"},
                       "confidence": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["yes", "confidence"],
        "additionalProperties": False,
    }),
}

valid = 0
for name, (question, schema) in SCHEMAS.items():
    for seed in range(5):
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}], max_tokens=200,
            temperature=0.8, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}})
        text = reply.choices[0].message.content
        assert reply.choices[0].finish_reason == "stop", (name, seed, text)
        jsonschema.validate(json.loads(text), schema)
        valid += 1
        if seed == 0:
            print(f"{name}: {text!r}")
print(f"json_schema: {valid} of 20 replies validate")

reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "List three colors."}],
                                       max_tokens=200, temperature=0.8, seed=1,
                                       response_format={"type": "json_object"})
obj = json.loads(reply.choices[0].message.content)
assert isinstance(obj, dict), obj
print("json_object:", reply.choices[0].message.content)

question, schema = SCHEMAS["weather"]
pieces = []
for chunk in client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=200, temperature=0.8, seed=3,
        stream=True, response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": schema}}):
    if chunk.choices and chunk.choices[0].delta.content:
        pieces.append(chunk.choices[0].delta.content)
jsonschema.validate(json.loads("".join(pieces)), schema)
print("streamed:", "".join(pieces))

try:
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                   response_format={"type": "json_schema",
                                                    "json_schema": {"name": "bad", "schema": {"type": "strin"}}})
    sys.exit("an invalid schema was accepted")
except openai.BadRequestError as e:
    print("invalid schema ->", e.status_code)
print("structured output: all checks passed")
