"""Tokenizers: the trained byte-level BPE, user tokenizer files and the mask-token rule."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from genesis.config import TokenizerConfig
from genesis.tokenizer import (
    SPECIAL_TOKENS,
    TokenizerError,
    find_mask_id,
    get_tokenizer,
    load_tokenizer_file,
    special_ids,
)


def test_trained_tokenizer_has_specials_and_mask(kjv_tokenizer):
    tok = kjv_tokenizer
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert find_mask_id(tok) == 3
    assert special_ids(tok) == {0, 1, 2, 3}
    assert tok.get_vocab_size() == 8000
    text = "Therefore being justified by faith, we have peace with God:\n"
    assert tok.decode(tok.encode(text).ids) == text  # byte-level: lossless
    assert tok.encode("a [MASK] b").ids.count(3) == 1  # the mask token is atomic


def _word_level(tmp_path, specials):
    vocab = {w: i for i, w in enumerate(["the", "for", "but"] + specials)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_user_tokenizer_mask_rules(tmp_path):
    assert find_mask_id(load_tokenizer_file(_word_level(tmp_path, ["<mask>"]))) == 3
    assert find_mask_id(load_tokenizer_file(_word_level(tmp_path, ["<pad>", "[MASK]"]))) == 4
    tok = load_tokenizer_file(_word_level(tmp_path, ["<blank>"]))
    assert find_mask_id(tok, "<blank>") == 3
    with pytest.raises(TokenizerError, match=r"no mask token \(\[MASK\] or <mask>\); add one with "
                                             r"tokenizer.add_special_tokens\(\['\[MASK\]'\]\)"):
        find_mask_id(tok)
    with pytest.raises(TokenizerError, match="has no token '<m>'"):
        find_mask_id(tok, "<m>")


def test_user_tokenizer_without_mask_fails_at_load(tmp_path):
    path = _word_level(tmp_path, ["<pad>"])
    with pytest.raises(TokenizerError, match="no mask token"):
        get_tokenizer(TokenizerConfig(path=str(path)), [], "", tmp_path)


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer file not found"):
        load_tokenizer_file(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    with pytest.raises(TokenizerError, match="not a tokenizers JSON file"):
        load_tokenizer_file(bad)


def test_transformers_tokenizers_are_accepted(kjv_tokenizer):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=kjv_tokenizer, mask_token="[MASK]", pad_token="<pad>")
    assert find_mask_id(hf) == 3 and {0, 3} <= special_ids(hf)
