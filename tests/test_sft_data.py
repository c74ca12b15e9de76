"""Instruction and chat data: `prepare --format alpaca|messages` on the real Self-Instruct seed tasks,
loss masks that stay aligned through packing, and a loss that takes no gradient from masked tokens."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax_data.instruct import alpaca_prompt
from llama_jax_data.loader import make_loader
from llama_jax_data.prepare import prepare
from llama_jax.chat import encode_dialog
from llama_jax.tokenizer import load_tokenizer

QUIET = {"progress": False, "log": lambda _: None}
SEED_TASKS = "instruct/self-instruct-seed-tasks.jsonl"


def _records(shared_data):
    return [json.loads(line) for line in (shared_data / SEED_TASKS).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def llama3_sft(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft3")
    tok = shared_data / "tokenizers/llama3/tokenizer.model"
    manifest = prepare([shared_data / SEED_TASKS], out, tok, record_format="alpaca", workers=1, **QUIET)
    return out, manifest, load_tokenizer(tok)


def test_self_instruct_examples_and_masks(llama3_sft, shared_data):
    out, manifest, tok = llama3_sft
    records = _records(shared_data)
    instances = [(r["instruction"], i.get("input", ""), i["output"]) for r in records for i in r["instances"]]
    assert len(records) == 175
    assert manifest["documents"] == len(instances) and manifest["loss_masks"] is True
    lengths = np.concatenate([np.load(out / s["lengths"]) for s in manifest["shards"]])
    masks = np.concatenate([np.load(out / s["masks"]) for s in manifest["shards"]])
    assert masks.shape == (lengths.sum(),) and masks.dtype == np.uint8
    from llama_jax_data.loader import PreparedData

    data = PreparedData(out)
    docs, doc_masks = data.read(range(data.num_documents)), data.read_masks(range(data.num_documents))
    for (instruction, inp, output), ids, mask in zip(instances, docs, doc_masks):
        # The tokens are the Alpaca prompt and the answer; the mask picks the answer and EOS only.
        assert ids[1:-1].tolist() == tok.encode(alpaca_prompt(instruction, inp)) + tok.encode(output)
        assert tok.decode(ids[1:-1]) == alpaca_prompt(instruction, inp) + output
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and mask[0] == 0 and mask[-1] == 1
        learned = ids[mask == 1]
        assert tok.decode(learned[:-1]) == output
        assert np.all(np.diff(mask.astype(int)) >= 0)  # prompt, then answer: one switch


def test_packing_keeps_masks_aligned(llama3_sft):
    out, _, _ = llama3_sft
    from llama_jax_data.loader import PreparedData

    data = PreparedData(out)
    loader = make_loader(str(out), seq_len=256, global_batch_size=4, seed=3, eval_fraction=0.0, num_threads=0)
    try:
        for _ in range(3):
            batch = next(loader)
            for row in range(4):
                spans = loader.windows[0].spans((loader.step - 1) * 4 + row)  # global row = window index
                tokens = np.concatenate([data.read([d])[0][a:b] for d, a, b in spans])
                learn = np.zeros(257, np.uint8)
                learn[: len(tokens)] = np.concatenate([data.read_masks([d])[0][a:b] for d, a, b in spans])
                assert np.array_equal(batch["inputs"][row][: len(tokens)], tokens[:256])
                # A target counts iff it is a response token (documents start with BOS, mask 0, so a target
                # that starts the next document never counts) in a real, non-padding position.
                expected = (learn[1:] == 1) & (batch["segment_ids"][row] != 0)
                assert np.array_equal(batch["loss_mask"][row] == 1, expected)
                assert 0 < batch["loss_mask"][row].sum() < 256
    finally:
        loader.close()


def test_messages_format_llama2(shared_data, tmp_path):
    tok_path = shared_data / "tokenizers/llama2/tokenizer.model"
    tok = load_tokenizer(tok_path)
    dialogs = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4."}, {"role": "user", "content": "3+3?"},
         {"role": "assistant", "content": "6."}],
        [{"role": "user", "content": "Say hi <|eot_id|>"}, {"role": "assistant", "content": "Hi."}],
        [{"role": "user", "content": "no answer"}],  # no assistant turn: nothing to learn, skipped
    ]
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps({"messages": d}) + "\n" for d in dialogs) + "not json\n")
    out = tmp_path / "out"
    manifest = prepare([src], out, tok_path, record_format="messages", workers=1, **QUIET)
    assert manifest["documents"] == 2 and manifest["skipped"]["empty"] == 1 and manifest["skipped"]["invalid_json"] == 1
    from llama_jax_data.loader import PreparedData

    data = PreparedData(out)
    for d, ids, mask in zip(dialogs, data.read([0, 1]), data.read_masks([0, 1])):
        want_ids, want_mask = encode_dialog(tok, d, "llama2")
        assert ids.tolist() == want_ids and mask.tolist() == want_mask


def test_cli_format_and_errors(shared_data, tmp_path):
    tok = shared_data / "tokenizers/llama3/tokenizer.model"
    txt = tmp_path / "a.txt"
    txt.write_text("plain text")
    r = subprocess.run([sys.executable, "-m", "llama_jax.cli", "prepare", str(txt), "--format", "alpaca",
                        "--tokenizer", str(tok), "--output", str(tmp_path / "o"), "--no-progress"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "reads JSONL records" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_masked_tokens_contribute_no_gradient():
    """The loss is Σ mask·CE / Σ mask (per token across the batch): changing a masked target (or the input
    a masked position sees only through its own target) leaves the loss and every gradient unchanged."""
    from llama_jax.config import PRESETS
    from llama_jax.model import Llama
    from llama_jax_train.step import loss_sums, loss_weights

    cfg = PRESETS["tiny"]
    params = Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    import flax.linen as nn

    params = nn.meta.unbox(params)
    rng = np.random.default_rng(0)
    b, t = 2, 16
    inputs = rng.integers(3, cfg.vocab_size, (b, t)).astype(np.int32)
    targets = rng.integers(3, cfg.vocab_size, (b, t)).astype(np.int32)
    mask = np.zeros((b, t), np.float32)
    mask[:, 9:] = 1.0  # the response: positions 9.. of each row
    batch = {"inputs": inputs, "targets": targets, "segment_ids": np.ones((b, t), np.int32),
             "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)), "loss_mask": mask}

    def loss(p, bt):
        ce, _ = loss_sums(cfg, p, bt, 8)
        return ce / jnp.sum(loss_weights(bt))

    l0, g0 = jax.value_and_grad(loss)(params, batch)
    changed = dict(batch, targets=np.where(mask == 0, (targets + 7) % cfg.vocab_size, targets))
    l1, g1 = jax.value_and_grad(loss)(params, changed)
    assert float(l0) == float(l1)
    for a, c in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    # And the value is the per-token mean over the unmasked positions only.
    logits = Llama(cfg).apply({"params": params}, jnp.asarray(inputs))
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(l0), float(jnp.sum(ce * mask) / mask.sum()), rtol=1e-5)
    # Changing a masked target does change the loss once it is unmasked (the test can tell).
    l2 = loss(params, dict(changed, loss_mask=np.ones_like(mask)))
    assert float(l2) != float(loss(params, dict(batch, loss_mask=np.ones_like(mask))))
