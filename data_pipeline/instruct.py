"""Instruction and chat records → (token ids, loss mask) for supervised fine-tuning (`prepare --format`).

Record formats (one JSON object a line):

- `alpaca`: `{"instruction", "input" (optional), "output"}`, rendered with Stanford Alpaca's published
  prompt template (`PROMPT_DICT` in its `train.py`): BOS + encode(prompt) + encode(output) + EOS, the
  loss on the output and EOS. Alpaca's `train.py` encodes prompt + output as one string and masks the
  prompt's own token count; with a byte-level BPE the two can merge at the join ("Response:The" is one
  Llama 3 piece), so its mask can cut into the answer. Encoding them apart keeps the mask exact and the
  training tokens equal to what the model reads and writes at generation time. The Self-Instruct layout `{"instruction", "instances": [{"input", "output"}, ...]}` is read
  in the same format: one example per instance. With a chat template named (`--template`), an example
  is instead one user turn (the instruction, a blank line, the input) and the assistant's answer in that
  template, so the model learns the format `generate --chat` speaks.
- `messages`: `{"messages": [{"role", "content"}, ...]}` (system / user / assistant, multi-turn), encoded
  with a chat template of `llama_jax.chat`; the loss covers the assistant turns and their end of turn.

A record that cannot be an example (a missing or non-string field, an empty output, a dialog without an
assistant turn) is skipped and counted under its reason, like a document in `llama_jax_data.sources`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np

from llama_jax.chat import check_messages, default_template, encode_dialog

__all__ = ["RECORD_FORMATS", "ALPACA_PROMPT", "ALPACA_PROMPT_NO_INPUT", "alpaca_example", "record_examples"]

RECORD_FORMATS = ("text", "alpaca", "messages")

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    if input_text:
        return ALPACA_PROMPT.format(instruction=instruction, input=input_text)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def alpaca_example(tok: Any, instruction: str, input_text: str, output: str) -> tuple[list[int], list[int]]:
    """(ids, mask) of one Alpaca example: BOS + encode(prompt) + encode(output) + EOS, loss on the output + EOS."""
    prompt = [tok.bos_id, *tok.encode(alpaca_prompt(instruction, input_text))]
    answer = [*tok.encode(output), tok.eos_id]
    return prompt + answer, [0] * len(prompt) + [1] * len(answer)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def record_examples(tok: Any, record: Any, record_format: str, template: str | None,
                    skipped: Counter) -> Iterator[tuple[list[int], list[int]]]:
    """The examples of one record (several for a Self-Instruct record); bad ones counted in `skipped`."""
    if not isinstance(record, dict):
        skipped["missing_field"] += 1
        return
    if record_format == "alpaca":
        instruction = _text(record.get("instruction"))
        if instruction is None:
            skipped["missing_field" if record.get("instruction") is None else "not_a_string"] += 1
            return
        instances = record.get("instances")
        if instances is None:
            instances = [record]
        elif not isinstance(instances, list):
            skipped["not_a_string"] += 1
            return
        for inst in instances:
            inp = _text(inst.get("input", "") or "") if isinstance(inst, dict) else None
            out = _text(inst.get("output")) if isinstance(inst, dict) else None
            if inp is None or out is None:
                skipped["missing_field"] += 1
            elif not out.strip():
                skipped["empty"] += 1
            elif template:  # one user turn (instruction, then the input) and the answer, in a chat template
                user = instruction + (f"\n\n{inp}" if inp else "")
                yield encode_dialog(tok, [{"role": "user", "content": user}, {"role": "assistant", "content": out}],
                                    template)
            else:
                yield alpaca_example(tok, instruction, inp, out)
    elif record_format == "messages":
        try:
            messages = check_messages(record.get("messages"))
        except ValueError:
            skipped["missing_field"] += 1
            return
        if not any(m["role"] == "assistant" for m in messages):
            skipped["empty"] += 1
            return
        try:
            yield encode_dialog(tok, messages, template or default_template(tok))
        except ValueError:  # e.g. roles that do not alternate, which Llama 2-Chat requires
            skipped["missing_field"] += 1
    else:
        raise ValueError(f"unknown record format {record_format!r}; expected one of {', '.join(RECORD_FORMATS)}")


def encode_examples(examples: list[tuple[list[int], list[int]]], dtype) -> tuple[bytes, np.ndarray, np.ndarray]:
    """(the examples' tokens end to end as `dtype` bytes, token count of each, their masks end to end)."""
    ids = [i for e, _ in examples for i in e]
    masks = [m for _, ms in examples for m in ms]
    counts = np.fromiter((len(e) for e, _ in examples), np.int64, len(examples))
    return np.asarray(ids, dtype).tobytes(), counts, np.asarray(masks, np.uint8)
