"""Chameleon-shaped reference files for the tests: a tokenizer laid out like Chameleon's
(``<s> <pad> </s> <unk>``, the ``IMGIMG...`` image tokens, ``<eoss>``, ``<racm3:break>``, reserved
ids, then the BPE's text tokens at the top of the id space), and tiny random HF Chameleons whose
``vocabulary_map`` is that tokenizer's."""

from __future__ import annotations

import json

import numpy as np

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


def hf_chameleon(vocab_map: dict[str, int], swin_norm: bool = False, seed: int = 0, **overrides):
    """A tiny random HF ``ChameleonForConditionalGeneration`` (GQA: 4 query heads, 2 kv heads)
    over ``vocab_map``, whose norms are not the identity (a swapped or transposed norm weight
    would show) and whose weights are large enough for peaked attention."""
    import torch
    import transformers
    vq = dict(embed_dim=16, num_embeddings=sum(k.startswith('IMGIMG') for k in vocab_map), latent_channels=16,
              resolution=32, in_channels=3, base_channels=32, channel_multiplier=[1, 1, 2], num_res_blocks=1,
              attn_resolutions=[], double_latent=False)
    config = transformers.ChameleonConfig(
        vocab_size=len(vocab_map), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, vq_config=vq,
        vocabulary_map=vocab_map, bos_token_id=vocab_map.get('<s>', 1), eos_token_id=vocab_map.get('</s>', 2),
        pad_token_id=vocab_map.get('<pad>'), swin_norm=swin_norm, initializer_range=0.1, **overrides)
    torch.manual_seed(seed)
    model = transformers.ChameleonForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'norm' in name and 'vqmodel' not in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def share_qk_norms(model, shards: int = 1) -> None:
    """Give every head of a model-parallel shard its shard's first QK-norm row, as Meta's layout
    stores one norm per shard (so the same weights can be written in both layouts)."""
    import torch
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(('q_norm.weight', 'q_norm.bias', 'k_norm.weight', 'k_norm.bias')):
                per = p.shape[0] // shards
                p.copy_(p[::per].repeat_interleave(per, 0))


def write_meta(model, tokenizer_json: str, root, shards: int = 1) -> None:
    """``model``'s weights in Meta's release layout under ``root``: models/7b/consolidated.NN.pth
    (``shards`` model-parallel pieces) and params.json, tokenizer/text_tokenizer.json. RoPE rows
    go back to interleaved pairs (the inverse of the converter's permutation)."""
    import pathlib
    import torch
    from cm3jax.convert.chameleon_files import half_to_interleaved
    c = model.config
    h, kv = c.num_attention_heads, c.num_key_value_heads
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    split = lambda w, axis: np.split(w, shards, axis=axis)  # noqa: E731
    parts = [{} for _ in range(shards)]

    def put(name, w, axis):
        for part, piece in zip(parts, split(w, axis) if axis is not None else [w] * shards):
            part[name] = torch.from_numpy(np.ascontiguousarray(piece))

    put('tok_embeddings.weight', sd['model.embed_tokens.weight'], 1)
    put('norm.weight', sd['model.norm.weight'], None)
    put('output.weight', sd['lm_head.weight'], 0)
    for i in range(c.num_hidden_layers):
        hf = lambda n: sd[f'model.layers.{i}.{n}']  # noqa: E731
        put(f'layers.{i}.attention.wq.weight', half_to_interleaved(hf('self_attn.q_proj.weight'), h), 0)
        put(f'layers.{i}.attention.wk.weight', half_to_interleaved(hf('self_attn.k_proj.weight'), kv), 0)
        put(f'layers.{i}.attention.wv.weight', hf('self_attn.v_proj.weight'), 0)
        put(f'layers.{i}.attention.wo.weight', hf('self_attn.o_proj.weight'), 1)
        put(f'layers.{i}.feed_forward.w1.weight', hf('mlp.gate_proj.weight'), 0)
        put(f'layers.{i}.feed_forward.w3.weight', hf('mlp.up_proj.weight'), 0)
        put(f'layers.{i}.feed_forward.w2.weight', hf('mlp.down_proj.weight'), 1)
        put(f'layers.{i}.attention_norm.weight', hf('input_layernorm.weight'), None)
        put(f'layers.{i}.ffn_norm.weight', hf('post_attention_layernorm.weight'), None)
        for which, n in (('q', h), ('k', kv)):
            for part_name in ('weight', 'bias'):
                rows = hf(f'self_attn.{which}_norm.{part_name}')[::n // shards]  # one per shard
                for part, row in zip(parts, rows):
                    part[f'layers.{i}.attention.{which}_normalization.{part_name}'] = torch.from_numpy(
                        np.ascontiguousarray(half_to_interleaved(row.reshape(-1, 1), 1)[:, 0]))
    root = pathlib.Path(root)
    (root / 'models' / '7b').mkdir(parents=True)
    for s, part in enumerate(parts):
        torch.save(part, root / 'models' / '7b' / f'consolidated.{s:02d}.pth')
    params = {'dim': c.hidden_size, 'n_layers': c.num_hidden_layers, 'n_heads': h, 'n_kv_heads': kv,
              'norm_eps': c.rms_norm_eps, 'rope_theta': c.rope_parameters['rope_theta'] if getattr(
                  c, 'rope_parameters', None) else c.rope_theta, 'swin_norm': c.swin_norm, 'qk_normalization': True,
              'max_seq_len': c.max_position_embeddings, 'model_parallel_size': shards}
    (root / 'models' / '7b' / 'params.json').write_text(json.dumps({'model': params}))
    (root / 'tokenizer').mkdir()
    (root / 'tokenizer' / 'text_tokenizer.json').write_text(tokenizer_json)


VQ_DDCONFIG = dict(double_z=False, z_channels=16, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                   num_res_blocks=1, attn_resolutions=[], dropout=0.0)  # 16 px -> 8x8 codes


def write_vqgan(folder, num_codes: int) -> dict:
    """A random taming VQ-GAN as Meta releases it: ``vqgan.ckpt`` (a Lightning ``state_dict``) and
    ``vqgan.yaml`` in ``folder``. Returns the state dict (numpy)."""
    import pathlib
    import torch
    import yaml
    from taming.modules.diffusionmodules.model import Decoder, Encoder
    torch.manual_seed(0)
    dd, z = VQ_DDCONFIG, VQ_DDCONFIG['z_channels']
    parts = {'encoder': Encoder(**dd), 'decoder': Decoder(**dd), 'quant_conv': torch.nn.Conv2d(z, 8, 1),
             'post_quant_conv': torch.nn.Conv2d(8, z, 1)}
    sd = {f'{p}.{k}': v for p, m in parts.items() for k, v in m.state_dict().items()}
    sd['quantize.embedding.weight'] = torch.randn(num_codes, 8)
    folder = pathlib.Path(folder)
    torch.save({'state_dict': sd}, folder / 'vqgan.ckpt')
    spec = {'model': {'params': {'embed_dim': 8, 'n_embed': num_codes, 'ddconfig': dd}}}
    (folder / 'vqgan.yaml').write_text(yaml.safe_dump(spec))
    return {k: v.numpy() for k, v in sd.items()}
