"""Tokenizers: train a byte-level BPE on the training split, or load a user's tokenizer.json; find the mask token.

The trained tokenizer carries four special tokens, `<pad>` `<s>` `</s>` `[MASK]` (ids 0-3). A user's tokenizer
must have a mask token (`[MASK]`, `<mask>` or the configured name): there is no silent fallback to another id.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from genesis.errors import GenesisError, write_failure

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "[MASK]"]
MASK_NAMES = ("[MASK]", "<mask>")
PAD_NAMES = ("<pad>", "[PAD]")
TRAINER_VERSION = "bpe-v1"  # bump when the training recipe changes, so cached tokenizers are rebuilt


class TokenizerError(GenesisError, ValueError):
    """A tokenizer that cannot be used, phrased as one line. A ValueError, as the masker's MaskingError is, so a
    plug-in caller catches bad input to `ConnectiveMasker.from_tokenizer` with one type."""


def as_tokenizers(tokenizer: Any) -> Tokenizer:
    """The `tokenizers.Tokenizer` behind a `tokenizers.Tokenizer` or a transformers fast tokenizer."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(backend, Tokenizer):
        return backend
    raise TokenizerError(
        f"expected a tokenizers.Tokenizer or a transformers *fast* tokenizer, got {type(tokenizer).__name__}"
    )


def special_ids(tokenizer: Any) -> set[int]:
    """Ids of special tokens (never masked, never drawn as random replacements)."""
    tok = as_tokenizers(tokenizer)
    ids = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    extra = getattr(tokenizer, "all_special_ids", None)  # transformers tokenizers
    if extra:
        ids |= {int(i) for i in extra if i is not None}
    return ids


def find_mask_id(tokenizer: Any, name: str = "") -> int:
    """The id of the mask token: `name` if given, else the transformers tokenizer's mask token, else [MASK]/<mask>."""
    tok = as_tokenizers(tokenizer)
    transformers = tok is not tokenizer  # a transformers fast tokenizer: its add_special_tokens takes a dict
    if name:
        tid = tok.token_to_id(name)
        if tid is None:
            raise TokenizerError(
                f"the tokenizer has no token {name!r} (the mask token asked for: mask_token= or tokenizer.mask_token "
                f"in config); add it with {_add_mask_call(name, transformers)} and save it, or name a token it has"
            )
        return tid
    hf_name = getattr(tokenizer, "mask_token", None) if transformers else None
    for cand in ([hf_name] if isinstance(hf_name, str) else []) + list(MASK_NAMES):
        tid = tok.token_to_id(cand)
        if tid is not None:
            return tid
    if transformers and isinstance(hf_name, str):
        unknown = f"tokenizer.mask_token is {hf_name!r}, which is not in its vocabulary, and it has no [MASK] or <mask>"
    else:
        unknown = "the tokenizer has no mask token ([MASK] or <mask>)"
    if transformers:
        name_it = "set tokenizer.mask_token (or pass mask_token=) to the name of the one it has"
    else:  # a tokenizers.Tokenizer has no mask_token attribute
        name_it = "name the one it has with mask_token= (from_tokenizer) or tokenizer.mask_token (config)"
    raise TokenizerError(f"{unknown}; add one with {_add_mask_call('[MASK]', transformers)} and save it, or {name_it}")


def _add_mask_call(name: str, transformers: bool) -> str:
    """The call that adds mask token `name`: a transformers tokenizer takes a dict (a list raises ValueError
    there), a tokenizers.Tokenizer a list."""
    if transformers:
        return f"tokenizer.add_special_tokens({{'mask_token': {name!r}}})"
    return f"tokenizer.add_special_tokens([{name!r}])"


def find_pad_id(tokenizer: Any) -> int | None:
    tok = as_tokenizers(tokenizer)
    for cand in PAD_NAMES:
        tid = tok.token_to_id(cand)
        if tid is not None:
            return tid
    return None


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """A byte-level BPE (GPT-2 style pre-tokenization, no prefix space) with SPECIAL_TOKENS at ids 0-3."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]


def load_tokenizer_file(path: str | os.PathLike) -> Tokenizer:
    p = Path(path).expanduser()
    if not p.is_file():
        raise TokenizerError(f"{p}: tokenizer file not found (tokenizer.path)")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise TokenizerError(f"{p}: not a tokenizers JSON file ({str(e).splitlines()[0]})") from None


def get_tokenizer(cfg, train_texts: list[str], train_hash: str, cache_dir: Path, log=print) -> Tokenizer:
    """The configured tokenizer: the user's file, or a BPE trained on `train_texts` (cached by content hash, with
    a checksum beside it: a cached file that is damaged is moved aside and retrained, with one `log` line)."""
    if cfg.path:
        tok = load_tokenizer_file(cfg.path)
    else:
        key = hashlib.sha256(f"{TRAINER_VERSION}|{train_hash}|{cfg.vocab_size}|{cfg.min_frequency}".encode())
        path = cache_dir / "tokenizers" / f"{key.hexdigest()[:16]}.json"
        tok = _cached_tokenizer(path, log) if path.exists() else None
        if tok is None:
            tok = train_bpe(train_texts, cfg.vocab_size, cfg.min_frequency)
            path.parent.mkdir(parents=True, exist_ok=True)
            text = tok.to_str(pretty=True)  # what tok.save writes
            for target, content in ((_checksum_path(path), _digest(text)), (path, text)):  # the checksum first
                tmp = target.with_name(target.name + f".tmp{os.getpid()}")
                try:
                    tmp.write_text(content, encoding="utf-8")
                    os.replace(tmp, target)
                except OSError as e:
                    tmp.unlink(missing_ok=True)
                    raise TokenizerError(f"{target}: cannot cache the trained tokenizer ({write_failure(e, tmp)}); "
                                         f"nothing was trained from it yet") from None
    find_mask_id(tok, cfg.mask_token)  # fail early, with the fix in the message
    return tok


def _checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".blake2b")


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def _cached_tokenizer(path: Path, log) -> Tokenizer | None:
    """The trained tokenizer cached at `path` if it matches its checksum and loads; else None, after moving the
    file aside (one log line). A file without a checksum (cached before checksums were kept) gets one if it loads."""
    try:
        text = path.read_text(encoding="utf-8")
        tok = Tokenizer.from_str(text)
        problem = ""
    except Exception as e:  # OSError, UnicodeDecodeError; tokenizers raises a bare Exception on malformed JSON
        problem = f"it is unreadable ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]})"
    checksum = _checksum_path(path)
    if not problem:
        try:
            if checksum.read_text(encoding="utf-8").strip() == _digest(text):
                return tok
            problem = "it does not match its checksum (changed on disk)"
        except FileNotFoundError:
            checksum.write_text(_digest(text), encoding="utf-8")
            return tok
        except (OSError, UnicodeDecodeError) as e:
            problem = f"its checksum {checksum.name} is unreadable ({e.strerror or e})"
    for older in path.parent.glob(f"{glob.escape(path.name)}.damaged-*"):  # at most one damaged copy kept
        older.unlink(missing_ok=True)
    aside = path.with_name(f"{path.name}.damaged-{os.getpid()}")
    try:
        os.replace(path, aside)
        checksum.unlink(missing_ok=True)
    except FileNotFoundError:  # another process moved it first
        pass
    except OSError as e:
        raise TokenizerError(f"{path}: the cached tokenizer is damaged ({problem}) and cannot be moved aside "
                             f"({e.strerror or e}); delete {path} and run again") from None
    if log is not None:
        log(f"cached tokenizer {path}: {problem}; moved it aside to {aside.name} and retraining it")
    return None
