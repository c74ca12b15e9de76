"""Chat templates against the families' own formatters: Meta's `llama-models` (Llama 3, Llama 4) and the
Llama 2-Chat template published with the model (rendered by jinja2, split at its BOS/EOS strings and each
piece encoded by SentencePiece, as Meta's `chat_completion` does)."""

import sys
import types

import pytest

from llama_jax.chat import encode_dialog
from llama_jax.tokenizer import load_tokenizer

SYSTEM = {"role": "system", "content": "You are a concise assistant. Answer in one sentence."}
DIALOGS = {
    "single": [{"role": "user", "content": "What is the capital of France?"}],
    "single+system": [SYSTEM, {"role": "user", "content": "Name three primes."}],
    "multi": [
        {"role": "user", "content": "Hello there!"},
        {"role": "assistant", "content": "Hi! How can I help you today?"},
        {"role": "user", "content": "Write a haiku about JAX.\nMake it rhyme."},
    ],
    "multi+system": [
        SYSTEM,
        {"role": "user", "content": " Translate 'cat' to French. "},
        {"role": "assistant", "content": "Chat."},
        {"role": "user", "content": "And 'dog'?"},
        {"role": "assistant", "content": "Chien."},
        {"role": "user", "content": "Thanks <|eot_id|> <|eot|> </s> [INST]"},
    ],
}


def _meta_messages(dialog):
    from llama_models.datatypes import RawMessage

    return [RawMessage(role=m["role"], content=m["content"]) for m in dialog]


@pytest.fixture(scope="module")
def llama3_pair(shared_data):
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    path = shared_data / "tokenizers/llama3/tokenizer.model"
    return load_tokenizer(path), ChatFormat(Tokenizer(path))


@pytest.fixture(scope="module")
def llama4_formatter(shared_data):
    # Meta's llama4 chat_format imports its image preprocessing (torchvision) at module level; text dialogs
    # never reach it, so a stand-in module without torchvision is enough to import the formatter.
    name = "llama_models.llama4.preprocess"
    stub = types.ModuleType(name)
    stub.ResizeNormalizeImageTransform = stub.VariableSizeImageTransform = object
    saved = sys.modules.get(name)
    sys.modules[name] = stub
    try:
        from llama_models.llama4.chat_format import ChatFormat
        from llama_models.llama4.tokenizer import Tokenizer
    finally:
        if saved is None:
            sys.modules.pop(name, None)
    meta_tok = Tokenizer(shared_data / "tokenizers/llama4/tokenizer.model")
    return meta_tok, ChatFormat(meta_tok)


class _TextOnly:
    """Meta's Llama 4 tokenizer behind the interface the templates use (llama-jax's tokenizer module reads
    Llama 2 and Llama 3 files; the template logic under test is ours)."""

    def __init__(self, meta_tok):
        self._t, self.special_tokens = meta_tok, meta_tok.special_tokens
        self.bos_id, self.eos_id = meta_tok.bos_id, meta_tok.eos_id

    def encode(self, text):
        return self._t.encode(text, bos=False, eos=False)


@pytest.mark.parametrize("name", list(DIALOGS))
def test_llama3_ids_equal_meta_formatter(llama3_pair, name):
    ours_tok, meta = llama3_pair
    dialog = DIALOGS[name]
    ids, mask = encode_dialog(ours_tok, dialog, "llama3", add_generation_prompt=True)
    assert ids == meta.encode_dialog_prompt(_meta_messages(dialog)).tokens
    assert len(mask) == len(ids)


@pytest.mark.parametrize("name", list(DIALOGS))
def test_llama4_ids_equal_meta_formatter(llama4_formatter, name):
    meta_tok, meta = llama4_formatter
    dialog = DIALOGS[name]
    ids, _ = encode_dialog(_TextOnly(meta_tok), dialog, "llama4", add_generation_prompt=True)
    assert ids == meta.encode_dialog_prompt(_meta_messages(dialog)).tokens


# meta-llama/Llama-2-7b-chat-hf tokenizer_config.json `chat_template` (the published template).
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}"
    "{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)


def _llama2_reference(sp_path, dialog):
    import re

    import jinja2
    import sentencepiece as spm

    def raise_exception(msg):
        raise ValueError(msg)

    env = jinja2.Environment()
    env.globals["raise_exception"] = raise_exception
    text = env.from_string(LLAMA2_CHAT_TEMPLATE).render(messages=dialog, bos_token="\x00B", eos_token="\x00E")
    sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    ids = []
    # Each BOS...EOS (or a trailing BOS...) is one SentencePiece call with BOS (and EOS). The markers stand in
    # for "<s>"/"</s>", which a message may spell as text.
    for piece, eos in re.findall(r"\x00B(.*?)(\x00E|$)", text, flags=re.S):
        ids += [sp.bos_id(), *sp.encode(piece)] + ([sp.eos_id()] if eos else [])
    return ids


@pytest.mark.parametrize("name", list(DIALOGS))
def test_llama2_ids_equal_published_template(shared_data, name):
    path = shared_data / "tokenizers/llama2/tokenizer.model"
    dialog = DIALOGS[name]
    ids, mask = encode_dialog(load_tokenizer(path), dialog, "llama2", add_generation_prompt=True)
    assert ids == _llama2_reference(path, dialog)
    assert len(mask) == len(ids)


def test_special_token_text_is_text_and_mask_covers_answers(llama3_pair):
    tok, _ = llama3_pair
    dialog = DIALOGS["multi+system"] + [{"role": "assistant", "content": "You're welcome."}]
    ids, mask = encode_dialog(tok, dialog, "llama3")
    eot = tok.special_tokens["<|eot_id|>"]
    # One end of turn per message, none from the user's "<|eot_id|>" text.
    assert ids.count(eot) == len(dialog)
    # The mask selects exactly the assistant contents, each with its end of turn.
    learned = [i for i, m in zip(ids, mask) if m]
    expected = []
    for m in dialog:
        if m["role"] == "assistant":
            expected += tok.encode(m["content"]) + [eot]
    assert learned == expected


def test_llama2_mask_covers_answers_and_eos(shared_data):
    tok = load_tokenizer(shared_data / "tokenizers/llama2/tokenizer.model")
    dialog = DIALOGS["multi"] + [{"role": "assistant", "content": "Arrays flow through jit."}]
    ids, mask = encode_dialog(tok, dialog, "llama2")
    learned = tok.decode([i for i, m in zip(ids, mask) if m])
    assert learned.replace(" ", "") == "Hi!HowcanIhelpyoutoday?ArraysflowthroughJIT.".replace("JIT", "jit")
    assert [i for i, m in zip(ids, mask) if m].count(tok.eos_id) == 2
    assert mask[0] == 0 and ids[0] == tok.bos_id


def test_bad_dialogs_are_one_sentence(shared_data):
    tok = load_tokenizer(shared_data / "tokenizers/llama2/tokenizer.model")
    with pytest.raises(ValueError, match="alternate"):
        encode_dialog(tok, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "llama2")
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        encode_dialog(tok, [{"role": "robot", "content": "a"}], "llama2")
    with pytest.raises(ValueError, match="unknown chat template"):
        encode_dialog(tok, DIALOGS["single"], "chatml")


def test_end_of_turn_ids(llama3_pair, shared_data):
    from llama_jax.chat import default_template, end_of_turn_ids

    tok, _ = llama3_pair
    assert default_template(tok) == "llama3"
    assert end_of_turn_ids(tok, "llama3") == {tok.special_tokens["<|eot_id|>"], tok.eos_id}
    sp = load_tokenizer(shared_data / "tokenizers/llama2/tokenizer.model")
    assert default_template(sp) == "llama2" and end_of_turn_ids(sp, "llama2") == {sp.eos_id}


def test_generate_chat_cli(shared_data, tmp_path, capsys):
    import jax
    import jax.numpy as jnp
    import flax.linen as nn

    from llama_jax import Llama
    from llama_jax.config import PRESETS
    from llama_jax.convert import save
    from llama_jax.generate_cli import add_arguments, main

    cfg = PRESETS["tiny"].replace(vocab_size=32000)
    params = nn.meta.unbox(Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    save(cfg, params, tmp_path / "m", format="hf")
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    tok = str(shared_data / "tokenizers/llama2/tokenizer.model")
    args = parser.parse_args([str(tmp_path / "m"), "--tokenizer", tok, "--chat", "--system", "Be brief.",
                              "--prompt", "Hi there", "--max-new-tokens", "3"])
    assert main(args) == 0
    out = capsys.readouterr()
    assert "[INST]" not in out.out and "new tokens for 1 prompt" in out.err
    bad = parser.parse_args([str(tmp_path / "m"), "--tokenizer", tok, "--system", "x", "--prompt", "Hi"])
    assert main(bad) == 2 and "--system and --template go with --chat" in capsys.readouterr().err
