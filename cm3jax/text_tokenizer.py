"""Byte-level BPE text tokenizer (HuggingFace ``tokenizers``), and text <-> joint-vocab ids.

The BPE owns ids [0, num_text) and nothing else: it has no special tokens, because the joint
`Vocab` owns ``<pad>``, ``<eos>``, ``<break>``, the sentinels, and so on. `encode_joint` puts BPE ids
into the joint vocab through `Vocab.text_ids`, and `decode_joint` maps them back.

Byte-level means every Python ``str`` without lone surrogates (these cannot be UTF-8 encoded) is a
sequence of bytes, and each of the 256 bytes is a token. So ``decode(encode(s)) == s`` holds for
any text, even with no merges learnt. No normalizer, no prefix space and no trimming are used.

    tok = train_bpe(captions, vocab_size=512)      # deterministic: same corpus, same tokenizer
    tok.save('tokenizer.json'); tok = TextTokenizer.load('tokenizer.json')
    ids = tok.encode_joint('a red circle', vocab)  # joint-vocab ids inside vocab's text range
    tok.decode_joint(ids, vocab) == 'a red circle'
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from cm3jax.errors import Cm3jaxError

BYTE_ALPHABET = 256  # a byte-level BPE's smallest vocabulary: one token per byte


class TokenizerTooLargeError(Cm3jaxError, ValueError):
    """The BPE has more ids than the joint vocab's text range holds."""


def _empty_byte_level() -> Tokenizer:
    tok = Tokenizer(models.BPE())  # no unk token: every byte is in the alphabet
    # use_regex=True: GPT-2's split (words, numbers, punctuation, whitespace runs); lossless.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> 'TextTokenizer':
    """Train a byte-level BPE on ``texts`` with at most ``vocab_size`` ids.

    vocab_size: >= 256 (the byte alphabet); the result has ``256 + merges`` ids, fewer than
        ``vocab_size`` when the corpus runs out of pairs seen ``min_frequency`` times.
    The result depends only on the corpus (and its order) and the two arguments: training twice
    gives the same `fingerprint`.
    """
    if vocab_size < BYTE_ALPHABET:
        raise ValueError(f'vocab_size={vocab_size}: a byte-level BPE needs at least {BYTE_ALPHABET} ids '
                         f'(one per byte); use >= {BYTE_ALPHABET} plus the merges you want')
    if min_frequency < 1:
        raise ValueError(f'min_frequency={min_frequency} must be >= 1')
    tok = _empty_byte_level()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=[], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((_check_text(t) for t in texts), trainer=trainer)
    return TextTokenizer(tok)


def _check_text(text) -> str:
    if not isinstance(text, str):
        raise TypeError(f'the BPE trains on str; got {type(text).__name__}')
    return text


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` seen as a map between text and ids [0, num_text).

    tokenizer: the wrapped ``tokenizers.Tokenizer`` (byte-level BPE from `train_bpe`, or any
        tokenizer loaded from a tokenizer.json, e.g. Chameleon's).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    # ---- Files ----

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as one JSON file (creating its directory). Written under a temporary
        name and renamed: a run killed while saving leaves no half-written tokenizer to resume with."""
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.tokenizer.save(path + '.tmp')
        os.replace(path + '.tmp', path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> 'TextTokenizer':
        """Read a tokenizer.json written by `save` (or any HuggingFace tokenizer.json)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f'no tokenizer file at {path!r}: train one with `cm3jax train-tokenizer` '
                                    f'or pass the path of a tokenizer.json')
        try:
            tok = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f'{path!r} is not a HuggingFace tokenizer.json ({e})') from None
        return cls(tok)

    @classmethod
    def from_str(cls, json_str: str) -> 'TextTokenizer':
        return cls(Tokenizer.from_str(json_str))

    def to_str(self) -> str:
        """The serialised tokenizer JSON."""
        return self.tokenizer.to_str()

    def fingerprint(self) -> str:
        """First 16 hex digits of the sha256 of the serialised JSON (data manifests record it, to
        refuse data tokenized by another tokenizer)."""
        return hashlib.sha256(self.to_str().encode('utf-8')).hexdigest()[:16]

    # ---- BPE ids ----

    @property
    def num_text(self) -> int:
        """Vocabulary size: the BPE's ids are [0, num_text)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> np.ndarray:
        """Text -> Int32[n] BPE ids."""
        _check_text(text)
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Texts -> one Int32[n_i] array each (encoded in parallel by the Rust library)."""
        texts = [_check_text(t) for t in texts]
        encs = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, np.int32) for e in encs]

    def decode(self, ids) -> str:
        """BPE ids -> text (exact inverse of `encode` for a byte-level BPE)."""
        ids = np.asarray(ids).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_text):
            raise ValueError(f'BPE ids must lie in [0, {self.num_text}); got [{ids.min()}, {ids.max()}] '
                             f'(joint-vocab ids? use decode_joint)')
        return self.tokenizer.decode(ids.tolist(), skip_special_tokens=False)

    # ---- Joint-vocab ids ----

    def check_fits(self, vocab) -> None:
        """Raise `TokenizerTooLargeError` unless every BPE id has a place in ``vocab``'s text range
        (or, for a vocab that is the tokenizer, unless the sizes agree)."""
        if vocab.text_is_bpe and self.num_text != vocab.size:
            raise TokenizerTooLargeError(
                f'the text tokenizer has {self.num_text} ids but the vocab it should be has {vocab.size}: '
                f'pass the tokenizer.json that came with the checkpoint')
        if self.num_text > vocab.bpe_capacity:
            raise TokenizerTooLargeError(
                f'the text tokenizer has {self.num_text} ids but vocab.num_text={vocab.num_text}: '
                f'set vocab.num_text >= {self.num_text} or train a smaller BPE')

    def encode_joint(self, text: str, vocab) -> np.ndarray:
        """Text -> Int32[n] ids in ``vocab``'s text range."""
        self.check_fits(vocab)
        return vocab.text_ids(self.encode(text))

    def encode_joint_batch(self, texts: Sequence[str], vocab) -> list[np.ndarray]:
        self.check_fits(vocab)
        return [vocab.text_ids(ids) for ids in self.encode_batch(texts)]

    def decode_joint(self, ids, vocab, non_text: str = 'raise') -> str:
        """Joint-vocab ids -> text.

        non_text: what to do with ids outside the text range (specials, sentinels, image codes):
            'raise' (default) raises ValueError naming them; 'drop' decodes only the text ids.
        """
        if non_text not in ('raise', 'drop'):
            raise ValueError(f"non_text={non_text!r}; choose 'raise' or 'drop'")
        self.check_fits(vocab)
        ids = np.asarray(ids).reshape(-1)
        text = np.asarray(vocab.is_text(ids), bool)
        if not text.all():
            if non_text == 'raise':
                raise ValueError(f'decode_joint got non-text ids {vocab.describe(ids[~text][:8])} '
                                 f"(pass non_text='drop' to skip them)")
            ids = ids[text]
        return self.decode(vocab.bpe_ids(ids))

    def __repr__(self) -> str:
        return f'TextTokenizer(num_text={self.num_text}, fingerprint={self.fingerprint()})'
