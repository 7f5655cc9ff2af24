"""Incremental detokenization (``llmir_tvm.engine.detokenizer``) against decoding the whole list.

References: the default model's Hugging Face tokenizer (byte-level BPE, where emoji and CJK
characters span several tokens) and a SentencePiece-style tokenizer built in memory (its decoder
drops the leading space of the first token, so a window decoded alone differs from the same
tokens in context)."""

from __future__ import annotations

import numpy as np
import pytest
import tokenizers
import transformers

from llmir_tvm.engine.detokenizer import IncrementalDetokenizer, fast_decode
from llmir_tvm.frontend.default_model import default_model_path

TEXT = "Hello wörld! 你好，世界 🙂🚀 naïve café — tab\there\nnew line  two  spaces 🧑‍🚀"


@pytest.fixture(scope="module")
def smol_tokenizer():
    return transformers.AutoTokenizer.from_pretrained(default_model_path())


def _check_incremental(decode, full, ids: list[int], prompt: list[int]) -> None:
    """After every token the incremental text is a prefix of the whole output's text; at the end it equals it."""
    tokens = list(prompt)
    detok = IncrementalDetokenizer(decode, start=len(prompt))
    for token in ids:
        tokens.append(token)
        text = detok.update(tokens)
        whole = full(tokens[len(prompt):])
        assert whole.startswith(text), (text, whole)
        assert "\ufffd" not in text[-1:]  # an incomplete character is held back
    assert detok.text == full(ids)


def test_byte_level_bpe_text_and_random_ids_match_a_full_decode(smol_tokenizer):
    tok = smol_tokenizer
    full = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    decode = fast_decode(tok)
    ids = tok(TEXT)["input_ids"]
    assert len(ids) > 30 and decode(ids) == full(ids) == TEXT
    _check_incremental(decode, full, ids, prompt=tok("Say:")["input_ids"])
    rng = np.random.default_rng(0)
    specials = list(tok.all_special_ids)
    random_ids = [int(i) for i in rng.integers(0, len(tok), size=200)] + specials + [int(i) for i in rng.integers(0, 300, 40)]
    _check_incremental(decode, full, random_ids, prompt=[1, 2])


def test_a_sentencepiece_style_decoder_keeps_the_spaces_between_windows():
    vocab = {"<unk>": 0, "▁Hello": 1, "▁world": 2, "!": 3, "▁how": 4, "▁are": 5, "▁you": 6, "<0xF0>": 7}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.decoder = tokenizers.decoders.Metaspace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False)
    ids = [1, 2, 3, 4, 5, 6, 3]
    assert fast.decode([2]) == "world"  # alone, the first token loses its space
    assert fast.decode(ids) == "Hello world! how are you!"
    full = lambda ids: fast.decode(ids, skip_special_tokens=True)  # noqa: E731
    _check_incremental(fast_decode(fast), full, ids, prompt=[4])
    _check_incremental(full, full, ids, prompt=[])


def test_fast_decode_goes_through_the_wrapper_when_it_cleans_up_spaces(smol_tokenizer):
    calls = []

    class Wrapper:
        backend_tokenizer = smol_tokenizer.backend_tokenizer
        clean_up_tokenization_spaces = True

        def decode(self, ids, skip_special_tokens=False):
            calls.append(list(ids))
            return "cleaned"

    assert fast_decode(Wrapper())([5, 6]) == "cleaned" and calls == [[5, 6]]
    ids = smol_tokenizer("a b")["input_ids"]
    assert fast_decode(smol_tokenizer)(ids) == "a b"
