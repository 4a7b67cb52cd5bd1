#!/usr/bin/env python3
"""Renders a chat template as transformers' `apply_chat_template` does (its Jinja environment:
`tojson`, Python's string methods) and prints the text as a JSON string.

usage: jinja_render.py JOB.json    JOB: {"template", "messages", "tools", "add_generation_prompt",
                                         "bos_token"}
"""
import json
import sys

from transformers.utils.chat_template_utils import _compile_jinja_template

job = json.load(open(sys.argv[1]))
template = _compile_jinja_template(job["template"])
print(json.dumps(template.render(messages=job["messages"], tools=job["tools"],
                                 add_generation_prompt=job["add_generation_prompt"],
                                 bos_token=job["bos_token"], eos_token="")))
