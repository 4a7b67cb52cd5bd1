#!/usr/bin/env python3
"""Loads a directory written by `chatforge export --format hf` with Hugging Face transformers (pip
`transformers` and `torch`, CPU) and prints, as JSON, the chat-template prompt ids for each message
and the greedy continuation of each given prompt.

usage: transformers_parity.py DIR JOBS.json      JOBS: [{"message": str, "prompt_ids": [...], "n": int}]
"""
import json, sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, jobs = sys.argv[1], json.load(open(sys.argv[2]))
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
model.eval()
out = []
for job in jobs:
    templated = tok.apply_chat_template([{"role": "user", "content": job["message"]}], add_generation_prompt=True,
                                        tokenize=True)
    if isinstance(templated, dict) or hasattr(templated, "input_ids"):
        templated = templated["input_ids"]
    ids = torch.tensor([job["prompt_ids"]])
    with torch.no_grad():
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=job["n"], do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    out.append({"template_ids": list(templated), "ids": gen[0, ids.shape[1]:].tolist()})
print(json.dumps(out))
