"""Chameleon-shaped reference files for the tests: a tokenizer laid out like Chameleon's
(``<s> <pad> </s> <unk>``, the ``IMGIMG...`` image tokens, ``<eoss>``, ``<racm3:break>``, reserved
ids, then the BPE's text tokens at the top of the id space), and tiny random HF Chameleons whose
``vocabulary_map`` is that tokenizer's."""

from __future__ import annotations

import json

from tokenizers import Tokenizer, decoders, models, trainers

CORPUS = ['a red circle left of a blue square', 'two green triangles above one yellow star',
          'the cat sat on the mat and looked at a small grey mouse', 'an image of a chameleon on a branch']


def code_name(i: int) -> str:
    """Chameleon's name of image code i: its digits as the letters A-J."""
    return 'IMGIMG' + ''.join(chr(65 + int(d)) for d in str(i)) + 'Z'


def tokenizer(size: int, num_codes: int, num_text: int = 60) -> Tokenizer:
    """A ``size``-id tokenizer: specials at 0-3, codes at 4.., ``<eoss>`` and ``<racm3:break>``
    after them, ``<image>``, reserved fillers, and a character BPE of ``num_text`` tokens (trained
    on `CORPUS`) in the last ids."""
    bpe = Tokenizer(models.BPE())
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=num_text, show_progress=False,
                                                        special_tokens=[]))
    learnt = bpe.get_vocab()
    head = ['<s>', '<pad>', '</s>', '<unk>', *map(code_name, range(num_codes)), '<eoss>', '<racm3:break>', '<image>']
    filler = size - len(head) - len(learnt)
    assert filler >= 0, f'{size} ids cannot hold {len(head)} specials and {len(learnt)} text tokens'
    vocab = {t: i for i, t in enumerate(head)} | {f'<reserved{i:05d}>': len(head) + i for i in range(filler)}
    vocab |= {t: size - len(learnt) + i for t, i in learnt.items()}
    merges = [tuple(m.split(' ')) if isinstance(m, str) else tuple(m)
              for m in json.loads(bpe.to_str())['model']['merges']]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.decoder = decoders.Fuse()
    return tok
