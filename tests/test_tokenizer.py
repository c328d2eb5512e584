import numpy as np
import pytest

from slowrun.tokenizer import GPT2Tokenizer, HFTokenizer, TokenizerError, parse_tokenizer_spec, token_byte_lengths

TEXT = "The quick brown fox jumps over the lazy dog. Café – naïve 日本語 🙂\n\nA second paragraph."


def test_gpt2_known_ids():
    tok = GPT2Tokenizer()
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.bos_id == 50256 and tok.vocab_size == 50257
    assert tok.decode([50256]) == "<|endoftext|>"
    # special-token text in a document is ordinary text, never the BOS id
    assert 50256 not in tok.encode("<|endoftext|>")
    assert tok.decode(tok.encode(TEXT)) == TEXT


def test_gpt2_batch_matches_single():
    tok = GPT2Tokenizer(threads=2)
    texts = [TEXT, "Hello world", "x" * 1000]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def _corpus():
    from slowrun.sources import builtin_corpus

    return builtin_corpus().heldout[:400]


def test_bpe_training_is_deterministic():
    docs = _corpus()
    a = HFTokenizer.train(iter(docs), 600)
    b = HFTokenizer.train(iter(docs), 600)
    assert a.to_json() == b.to_json()
    assert a.vocab_size == 600 and a.bos_id == 0
    assert a.decode(a.encode(TEXT)) == TEXT


@pytest.mark.parametrize("kind", ["gpt2", "bpe"])
def test_token_byte_lengths_sum_to_utf8_length(kind):
    tok = GPT2Tokenizer() if kind == "gpt2" else HFTokenizer.train(iter(_corpus()), 600)
    lengths = np.asarray(token_byte_lengths(tok))
    ids = tok.encode(TEXT)
    assert lengths[ids].sum() == len(TEXT.encode("utf-8"))
    assert lengths[tok.bos_id] == 0


def test_tokenizer_specs(tmp_path):
    assert parse_tokenizer_spec("gpt2") == ("gpt2", None)
    assert parse_tokenizer_spec("bpe:8192") == ("bpe", 8192)
    with pytest.raises(TokenizerError, match="unknown tokenizer"):
        parse_tokenizer_spec("sentencepiece")
    with pytest.raises(TokenizerError, match="integer"):
        parse_tokenizer_spec("bpe:lots")
    with pytest.raises(TokenizerError, match="not found"):
        parse_tokenizer_spec(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot read tokenizer"):
        HFTokenizer.from_file(bad)


def test_bpe_is_named_by_the_size_it_came_out_at():
    tok = HFTokenizer.train(iter(["a tiny text, a tiny text"] * 3), 999_999)
    assert tok.vocab_size < 1000 and tok.name == f"bpe:{tok.vocab_size}"
    assert HFTokenizer.train(iter(_corpus()), 600).name == "bpe:600"  # a text big enough keeps the size asked
