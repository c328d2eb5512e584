"""Document sources refuse what they cannot read faithfully, naming the file and place."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from slowrun.sources import SourceError, local_corpus, pt_corpus, require_source


def test_jsonl_text_that_is_not_a_string_is_an_error(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": 42}) + "\n")
    with pytest.raises(SourceError, match=r"docs.jsonl:2: 'text' is int, not a string"):
        local_corpus(f)
    f.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": ""}) + "\n")
    assert local_corpus(f).heldout == ["fine"]  # an empty string is an empty document, skipped


def _pt(path, tokens, starts):
    torch.save({"tokens": torch.tensor(tokens, dtype=torch.int32), "doc_starts": torch.tensor(starts), "bos_id": 50256}, path)


def test_pt_token_outside_the_vocabulary_is_refused(tmp_path):
    _pt(tmp_path / "ok.pt", [50256, 1, 2, 50256, 3], [0, 3])
    assert [d.tolist() for d in pt_corpus(tmp_path / "ok.pt").heldout] == [[1, 2], [3]]
    _pt(tmp_path / "bad.pt", [50256, 1, 60000, 50256, 3], [0, 3])
    with pytest.raises(SourceError, match=r"token id 60000 at position 2 is outside GPT-2's vocabulary"):
        pt_corpus(tmp_path / "bad.pt")
    _pt(tmp_path / "neg.pt", [50256, -1], [0])
    with pytest.raises(SourceError, match="token id -1"):
        pt_corpus(tmp_path / "neg.pt")


def test_missing_local_source(tmp_path):
    require_source("builtin")
    require_source("hf:HuggingFaceFW/fineweb")
    with pytest.raises(SourceError, match="no such file or directory"):
        require_source(str(tmp_path / "nope"))
    with pytest.raises(SourceError, match=r"--source fineweb: no such .* FineWeb is hf:HuggingFaceFW/fineweb:sample-10BT\)$"):
        require_source("fineweb")  # a name, not a path: the message says how to name a source


def test_a_bpe_smaller_than_asked_is_named_by_its_real_size(tmp_path):
    words = " ".join(f"w{i}" for i in range(300))
    f = tmp_path / "small.txt"
    f.write_text("\n===\n".join(f"{words} doc {i}" for i in range(40)))
    out = tmp_path / "ds"
    r = subprocess.run([sys.executable, "-m", "slowrun", "prepare", "--source", str(f), "--separator", "===",
                        "--tokenizer", "bpe:100000", "--train-tokens", "2k", "--val-tokens", "200", "--test-tokens", "200",
                        "--out", str(out), "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    vocab = manifest["tokenizer"]["vocab_size"]
    assert vocab < 100_000 and manifest["tokenizer"]["id"] == f"bpe:{vocab}"
    assert len(np.load(out / "token_bytes.npy")) == vocab
    notes = [l for l in r.stdout.splitlines() if l.startswith("note:")]
    assert len(notes) == 1 and "asked for 100,000" in notes[0] and f"gave only {vocab:,}" in notes[0]


def test_a_pt_file_in_another_pickle_protocol_is_refused_without_warnings(tmp_path):
    """The weights-only unpickler cannot read protocol 4: one clear error, and no torch warning on the way."""
    import warnings

    torch.save({"tokens": torch.tensor([50256, 5, 6], dtype=torch.int32), "doc_starts": torch.tensor([0]), "bos_id": 50256},
               tmp_path / "p4.pt", pickle_protocol=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(SourceError, match="not a tokens file loadable with weights_only=True"):
            pt_corpus(tmp_path / "p4.pt")
    assert not caught, [str(w.message) for w in caught]


def test_a_pickled_npy_is_refused_in_one_line(tmp_path):
    from slowrun.dataset import DatasetError, load_array

    np.save(tmp_path / "ok.npy", np.arange(3))
    assert load_array(tmp_path / "ok.npy").tolist() == [0, 1, 2]
    np.save(tmp_path / "evil.npy", np.array([{"payload": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DatasetError, match="evil.npy: not a plain numeric array"):
        load_array(tmp_path / "evil.npy")


def _bad_byte_txt(path, at=1000):
    """A 3,000-line UTF-8 text with one stray byte (\\xff) at byte `at`."""
    text = "\n".join(f"Café naïve line {i} of the quick brown fox." for i in range(3000)).encode()
    path.write_bytes(text[:at] + b"\xff" + text[at + 1:])
    return text


def test_a_stray_byte_in_a_txt_is_refused_with_its_offset(tmp_path):
    """Not decoded whole in another encoding nor replaced silently: the file and byte are named."""
    f = tmp_path / "bad.txt"
    _bad_byte_txt(f)
    with pytest.raises(SourceError, match=r"bad.txt: not valid utf-8 at byte 1,000 \(line 23\).*--encoding"):
        local_corpus(f, separator="\n")
    r = subprocess.run([sys.executable, "-m", "slowrun", "prepare", "--source", str(f), "--separator", "\\n",
                        "--tokenizer", "gpt2", "--train-tokens", "2k", "--val-tokens", "200", "--test-tokens", "200",
                        "--out", str(tmp_path / "ds"), "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "bad.txt: not valid utf-8 at byte 1,000" in r.stderr and not (tmp_path / "ds").exists()


def test_a_stray_byte_in_a_jsonl_is_refused_with_its_line(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_bytes(json.dumps({"text": "fine"}).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    with pytest.raises(SourceError, match=r"docs.jsonl: not valid utf-8 at byte 30 \(line 2\)"):
        local_corpus(f)


def test_encoding_the_user_chooses(tmp_path):
    f = tmp_path / "latin.txt"
    f.write_bytes("Café naïve\n===\nÉtude à deux\n".encode("cp1252"))
    assert local_corpus(f, separator="===", encoding="cp1252").heldout == ["Café naïve", "Étude à deux"]
    with pytest.raises(SourceError, match="--encoding klingon: unknown"):
        local_corpus(f, encoding="klingon")
    from slowrun.prepare import PrepareConfig, prepare

    out = prepare(PrepareConfig(source=str(f), separator="===", tokenizer="gpt2", train_tokens=2, val_tokens=2,
                                test_tokens=0, out=str(tmp_path / "ds"), encoding="cp1252", progress=False))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["params"]["encoding"] == "cp1252" and manifest["source"]["encoding"] == "cp1252"
    # the default encoding is left out of the parameters, so datasets prepared before --encoding stay the same
    utf = tmp_path / "utf.txt"
    utf.write_text("one\n===\ntwo\n===\nthree", encoding="utf-8")
    out = prepare(PrepareConfig(source=str(utf), separator="===", tokenizer="gpt2", train_tokens=2, val_tokens=2,
                                test_tokens=0, out=str(tmp_path / "ds2"), progress=False))
    assert "encoding" not in json.loads((out / "manifest.json").read_text())["params"]
