import re
import socket

import pytest
import torch

from moegen.host.demo import (
    CONTEXT,
    checkpoint_dir,
    decode,
    encode,
    expert_usage,
    generate,
    heldout,
    load_demo,
    perplexity,
    training_text,
    unigram_perplexity,
)
from moegen.host.demo.model import _windows, teacher_forced
from moegen.host.demo.train import train

# held-out bytes the quality tests measure on (a subset keeps them fast on 2 cores)
EVAL_BYTES = 32 * 1024
# the shipped checkpoint measures 4.2795 per byte on heldout(EVAL_BYTES) (4.142 on all of it);
# the unigram baseline there is 26.2
PPL_BOUND = 4.6


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # as in training (moegen.host.demo.train.THREADS): two threads stall on a loaded 2-core machine
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _refuse_network(*args, **kwargs):
    raise OSError("network access in a test that must run offline")


@pytest.fixture(scope="module")
def model():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", _refuse_network)
        patch.setattr(socket, "create_connection", _refuse_network)
        return load_demo()


def test_checkpoint_is_small_and_loads_offline(model):
    sizes = {entry.name: len(entry.read_bytes()) for entry in checkpoint_dir().iterdir()}
    assert {"config.json", "model.safetensors"} <= sizes.keys()
    assert sum(sizes.values()) <= 10 * 2**20
    assert not model.training
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())
    config = model.config
    assert (config.num_hidden_layers, config.num_local_experts, config.num_experts_per_tok) == (4, 8, 2)
    assert (config.hidden_size, config.intermediate_size, config.vocab_size) == (128, 256, 256)


def test_heldout_perplexity_is_below_bound_and_far_below_unigram(model):
    data = heldout(EVAL_BYTES)
    measured = perplexity(model, data)
    assert measured < PPL_BOUND
    assert measured < unigram_perplexity(training_text(), data) / 5
    assert perplexity(model, data) == measured


def test_every_expert_of_every_layer_gets_heldout_tokens(model):
    usage = expert_usage(model, heldout(EVAL_BYTES))
    assert usage.shape == (4, 8)
    assert (usage.sum(dim=1) == EVAL_BYTES // CONTEXT * CONTEXT * 2).all()
    assert (usage > 0).all()


def test_generate_is_greedy_and_continues_the_prompt(model):
    text = generate(model, "import ", 32)
    assert text.startswith("import ")
    assert len(text.encode()) >= len("import ") + 1
    assert generate(model, "import ", 32) == text


def test_training_reproduces_its_losses():
    # the recipe's first steps on smaller batches: the same code path, seconds instead of minutes
    first = train(steps=3, batch_size=2, context=64, log=lambda line: None)
    assert train(steps=3, batch_size=2, context=64, log=lambda line: None) == first
    assert len(first) == 3
    assert all(5.0 < loss < 6.0 for loss in first)  # near ln(256) = 5.55 from a random start


def test_tokenizer_round_trip():
    text = "def f(x):\n    return 'ünïcode ✓' + x\n"
    assert decode(encode(text)) == text
    assert encode(text.encode()) == list(text.encode())
    assert encode(bytes(range(256))) == list(range(256))
    assert decode([0xFF]) == "\ufffd"


def test_corpus_split_is_by_module():
    held, train_text = heldout(), training_text()
    assert len(held) >= 50 * 1024
    assert heldout(100) == held[:100]
    held_modules = set(re.findall(rb"^# Lib/(\S+)$", held, re.M))
    train_modules = set(re.findall(rb"^# Lib/(\S+)$", train_text, re.M))
    assert held_modules and train_modules and not held_modules & train_modules
    for nbytes in (0, len(held) + 1):
        with pytest.raises(ValueError, match="nbytes"):
            heldout(nbytes)


@pytest.mark.parametrize(("size", "context", "stride"), [(256, 256, 128), (1000, 256, 128), (1000, 256, 255),
                                                         (1000, 256, 1), (513, 64, 64 - 1), (300, 2, 1)])
def test_perplexity_windows_score_every_byte_once(size, context, stride):
    scored = []
    for start, skip in _windows(size, context, stride):
        assert 0 <= start <= size - context
        scored.extend(range(start + skip + 1, start + context))
    assert scored == list(range(1, size))


@pytest.mark.parametrize(("size", "context", "stride", "match"), [(300, 256, 256, "stride"), (300, 256, 0, "stride"),
                                                                  (100, 256, 128, "at least context"),
                                                                  (300, 1, 1, "context")])
def test_perplexity_rejects_bad_windows(size, context, stride, match):
    with pytest.raises(ValueError, match=match):
        _windows(size, context, stride)


def test_teacher_forced_decoding_scores_what_one_full_pass_scores(model):
    data = heldout(200)
    ids = torch.tensor([encode(data)])
    with torch.no_grad():
        full = model(input_ids=ids[:, :82], use_cache=False).logits[0]
    # steps feed bytes 64..80 and predict 65..81
    expected = int((full[64:81].argmax(-1) == ids[0, 65:82]).sum())
    prompts = []
    assert teacher_forced(model, data, 17, prompt=64, after_prompt=lambda: prompts.append(1)) == expected
    assert prompts == [1]
    with pytest.raises(ValueError, match="data holds 200 bytes; prompt 150 and 60 steps need 211"):
        teacher_forced(model, data, 60, prompt=150)
