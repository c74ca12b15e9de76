"""Chat templates of the LLaMA families, as token ids plus a loss mask (supervised fine-tuning, `generate --chat`).

Each template follows the model family's own reference formatter, token for token:

- `llama2`: Llama 2-Chat (Meta's `llama/generation.py`, `chat_completion`). Every (user, assistant) pair is
  one SentencePiece call on `"[INST] {user} [/INST] {assistant} "` with BOS and EOS; a final user turn is
  `"[INST] {user} [/INST]"` with BOS. A system prompt is folded into the first user turn as
  `"<<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user}"`; contents are stripped.
- `llama3`: Meta's `llama_models/llama3/chat_format.py`: `<|begin_of_text|>`, then per message
  `<|start_header_id|>{role}<|end_header_id|>` + "\\n\\n" + content + `<|eot_id|>`; the generation prompt
  is the assistant header. Contents are not stripped (as in Meta's formatter).
- `llama4`: Meta's `llama_models/llama4/chat_format.py`: the same with `<|header_start|>`, `<|header_end|>`
  and `<|eot|>`.

Special tokens come only from the template: message text is encoded with the tokenizer's ordinary
`encode`, so a user who types "<|eot_id|>" gets the characters, never the control token.

The loss mask is 1 on what the model must learn to produce — the assistant's content and its end of turn
(`<|eot_id|>` / `<|eot|>`, or Llama 2's trailing space and EOS) — and 0 on BOS, headers, system and user
turns. A tokenizer here needs `encode(text)` (ordinary text, no BOS/EOS), `bos_id`, `eos_id`, and for the
tiktoken templates a `special_tokens` dict (name → id).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["TEMPLATES", "encode_dialog", "default_template", "end_of_turn_ids", "check_messages"]

TEMPLATES = ("llama2", "llama3", "llama4")
ROLES = ("system", "user", "assistant")

_B_INST, _E_INST = "[INST]", "[/INST]"
_B_SYS, _E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
_HEADERS = {  # template: (begin of text, header start, header end, end of turn)
    "llama3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "llama4": ("<|begin_of_text|>", "<|header_start|>", "<|header_end|>", "<|eot|>"),
}


def default_template(tok: Any) -> str:
    """The template that fits a tokenizer: Llama 4 and Llama 3 by their special tokens, else Llama 2."""
    special = getattr(tok, "special_tokens", None) or {}
    if "<|header_start|>" in special:
        return "llama4"
    if "<|start_header_id|>" in special:
        return "llama3"
    return "llama2"


def end_of_turn_ids(tok: Any, template: str) -> frozenset[int]:
    """The ids that end an assistant turn under `template` (where `generate --chat` stops)."""
    if template == "llama2":
        return frozenset({tok.eos_id})
    eot = _HEADERS[template][3]
    return frozenset({tok.special_tokens[eot], tok.eos_id})


def check_messages(messages: Any, where: str = "messages") -> list[dict]:
    """The messages as a list of {role, content}, or a ValueError naming what is wrong."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise ValueError(f"{where} must be a non-empty list of {{role, content}} objects, got {messages!r:.80}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}[{i}] must be {{role: system|user|assistant, content: text}}, got {m!r:.80}")
        if m["role"] == "system" and i != 0:
            raise ValueError(f"{where}[{i}]: a system message may only come first")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def encode_dialog(tok: Any, messages: Sequence[Mapping[str, str]], template: str,
                  add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of a dialog under `template` (see the module docstring).

    `add_generation_prompt` appends what the model reads before it answers (the assistant header; for
    Llama 2 the final user turn already ends with `[/INST]`)."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; expected one of {', '.join(TEMPLATES)}")
    messages = check_messages(messages)
    if template == "llama2":
        return _llama2(tok, messages)
    return _header_template(tok, messages, template, add_generation_prompt)


def _header_template(tok, messages, template, add_generation_prompt):
    begin, h_start, h_end, eot = (tok.special_tokens[s] for s in _HEADERS[template])

    def header(role: str) -> list[int]:
        return [h_start, *tok.encode(role), h_end, *tok.encode("\n\n")]

    ids, mask = [begin], [0]
    for m in messages:
        head, body = header(m["role"]), list(tok.encode(m["content"])) + [eot]
        learn = 1 if m["role"] == "assistant" else 0
        ids += head + body
        mask += [0] * len(head) + [learn] * len(body)
    if add_generation_prompt:
        head = header("assistant")
        ids += head
        mask += [0] * len(head)
    return ids, mask


def _llama2(tok, messages):
    if messages[0]["role"] == "system":
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise ValueError("Llama 2-Chat: a system message must be followed by a user message")
        messages = [{"role": "user", "content": _B_SYS + messages[0]["content"] + _E_SYS + messages[1]["content"]},
                    *messages[2:]]
    for i, m in enumerate(messages):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise ValueError(f"Llama 2-Chat: messages must alternate user/assistant (after an optional system "
                             f"message); message {i} is {m['role']!r}, expected {want!r}")
    ids: list[int] = []
    mask: list[int] = []
    for user, answer in zip(messages[::2], messages[1::2]):
        prompt = f"{_B_INST} {user['content'].strip()} {_E_INST}"
        turn = tok.encode(f"{prompt} {answer['content'].strip()} ")
        # SentencePiece pieces start at a space, so the prompt's own encoding is a prefix of the turn's;
        # where it is not (never seen with LLaMA's model), the common prefix is the prompt.
        head = tok.encode(prompt)
        n = 0
        while n < min(len(head), len(turn)) and head[n] == turn[n]:
            n += 1
        ids += [tok.bos_id, *turn, tok.eos_id]
        mask += [0] * (1 + n) + [1] * (len(turn) - n + 1)
    if len(messages) % 2 == 1:
        last = tok.encode(f"{_B_INST} {messages[-1]['content'].strip()} {_E_INST}")
        ids += [tok.bos_id, *last]
        mask += [0] * (1 + len(last))
    return ids, mask

