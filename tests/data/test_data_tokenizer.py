"""The Tokenizer wrapper: exact round trips, special tokens, determinism, save/load."""

from __future__ import annotations

import pytest

from mlmega.config.errors import ConfigError
from mlmega.data import SPECIAL_TOKENS, Tokenizer

TRAIN = [
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n",
    "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n",
] * 20
HELD_OUT = [
    "And by opposing end them.  Tabs\there, trailing spaces   \n\n\nblank lines",
    "Unicode: café, naïve, Straße, 東京, emoji 🙂, math ∑x² — dashes…",
    "Literal specials stay text: [CLS] [SEP] [MASK] [PAD] [UNK] <|endoftext|>",
    "",
    " leading space and\r\nwindows newline",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(TRAIN, vocab_size=400)


@pytest.mark.parametrize("text", HELD_OUT)
def test_round_trip_text_ids_text(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert not set(ids) & tok.special_ids  # raw text never yields a special id
    assert tok.decode(ids) == text


def test_batch_encoding_equals_single(tok):
    assert tok.encode_batch(HELD_OUT) == [tok.encode(t) for t in HELD_OUT]


def test_special_tokens_are_distinct_and_first(tok):
    ids = [tok.pad, tok.unk, tok.cls, tok.sep, tok.mask, tok.eod]
    assert ids == [0, 1, 2, 3, 4, 5]
    assert [tok.id_to_token(i) for i in ids] == list(SPECIAL_TOKENS)
    assert tok.decode([tok.cls, *tok.encode("hi"), tok.sep]) == "[CLS]hi[SEP]"
    assert tok.decode([tok.cls, *tok.encode("hi"), tok.sep], skip_special_tokens=True) == "hi"


def test_training_is_deterministic_and_bounded(tok):
    again = Tokenizer.train(TRAIN, vocab_size=400)
    assert again.to_str() == tok.to_str() and again.fingerprint == tok.fingerprint
    assert 262 < tok.vocab_size <= 400
    assert len(tok.encode(TRAIN[0])) < len(TRAIN[0]) / 2  # merges learned on the training text


def test_save_load_keeps_everything(tok, tmp_path):
    tok.save(tmp_path / "tokenizer.json")
    loaded = Tokenizer.load(tmp_path / "tokenizer.json")
    assert loaded.to_str() == tok.to_str()
    assert loaded.vocab_size == tok.vocab_size and loaded.special_ids == tok.special_ids
    assert [loaded.encode(t) for t in HELD_OUT] == [tok.encode(t) for t in HELD_OUT]
    assert loaded.unique_identifiers == tok.unique_identifiers
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]  # no temp file left


def test_gpt2_files_get_bert_specials_appended(tok, tmp_path):
    import json

    # a GPT-2 style pair without the bracketed specials: <|endoftext|> keeps its id, the others follow
    vocab = {k: v for k, v in tok.backend.get_vocab(with_added_tokens=False).items() if k not in SPECIAL_TOKENS}
    vocab = {k: i for i, k in enumerate(sorted(vocab, key=vocab.get))}
    vocab["<|endoftext|>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    tok.backend.model.save(str(tmp_path), "orig")
    (tmp_path / "merges.txt").write_text((tmp_path / "orig-merges.txt").read_text())
    g = Tokenizer.from_gpt2_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    assert g.eod == len(vocab) - 1
    assert sorted([g.pad, g.unk, g.cls, g.sep, g.mask]) == list(range(len(vocab), len(vocab) + 5))
    assert g.vocab_size == len(vocab) + 5
    assert g.decode(g.encode(HELD_OUT[1])) == HELD_OUT[1]


def test_too_small_vocab_is_a_config_error():
    with pytest.raises(ConfigError, match="--vocab-size 100: expected at least 262"):
        Tokenizer.train(TRAIN, vocab_size=100)
