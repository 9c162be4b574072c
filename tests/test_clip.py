"""The CLIP retriever: parity with transformers' CLIPModel, the converter, the loss and the
document rule, and a (2, 2, 2) mesh.

The parity reference is a tiny random ``CLIPModel`` (docs/stack_notes.md, "Parity references"), built with both of transformers'
text-pooling rules (``eos_token_id == 2``: argmax of the ids; otherwise: the first eos). Its
biases, norms and class token get noise, since transformers initialises them to 0 / 1 and a
transposed or misplaced one would otherwise go unseen. Parity tests skip without transformers.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn

from cm3jax import params as params_lib, parallel
from cm3jax.retrieval import hf_clip as convert
from cm3jax.retrieval import clip

ATOL = 1e-4
T = 12  # text length of the test batch
TINY = clip.ClipConfig(vocab_size=100, max_len=16, text_width=32, text_layers=2, text_heads=4, text_mlp_dim=64,
                       image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_heads=4,
                       vision_mlp_dim=64, projection_dim=16, eos_token_id=99)


def hf_clip(eos_token_id: int):
    torch = pytest.importorskip('torch')
    transformers = pytest.importorskip('transformers')
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
                max_position_embeddings=16, bos_token_id=0, pad_token_id=1, eos_token_id=eos_token_id)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4)
    hf_config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    torch.manual_seed(0)
    model = transformers.CLIPModel(hf_config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim <= 1:  # biases, norms, class token, logit_scale
                p.add_(0.1 * torch.randn_like(p))
    return model


def state_dict(model):
    return {k: v.numpy() for k, v in model.state_dict().items()}


def text_batch(eos: int, legacy: bool):
    """ids, mask [4, T]: right padding of two lengths, a full row, a left-padded row.

    Legacy (eos 2) pools at argmax(ids), so the row's largest id (99) ends the text and id 2
    appears earlier; otherwise the eos id ends the text, larger ids appear before it, and one
    row pads with the eos id itself (transformers takes its *first* occurrence).
    """
    rs = np.random.RandomState(1)
    end = 99 if legacy else eos
    content = [i for i in range(3, 99) if i != end]
    ids = rs.choice(content, (4, T)).astype(np.int32)
    mask = np.ones((4, T), np.int32)
    if legacy:
        ids[0, 2] = 2
    else:
        ids[:, 4] = 98  # larger than eos: argmax(ids) pools elsewhere
    for row, length in ((0, 6), (2, 9)):
        ids[row, length - 1] = end
        ids[row, length:] = 1 if (legacy or row == 0) else eos
        mask[row, length:] = 0
    ids[1, -1] = end
    ids[3, :4], mask[3, :4], ids[3, -1] = 1, 0, end
    return ids, mask


def sample_images():
    return np.random.RandomState(2).rand(3, 32, 32, 3).astype(np.float32)


@pytest.fixture(scope='module', params=[2, 50], ids=['eos2-legacy-argmax', 'eos50-first-eos'])
def reference(request):
    """(cfg, params, ids, mask, images, HF outputs) for one pooling rule."""
    import torch
    model = hf_clip(request.param)
    cfg = convert.config_from_hf(model.config)
    ids, mask = text_batch(request.param, legacy=request.param == 2)
    images = sample_images()
    pixels = (images - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                    pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))[[0, 1, 2, 0]], return_loss=True)
        want = dict(text_features=model.get_text_features(input_ids=torch.from_numpy(ids).long(),
                                                          attention_mask=torch.from_numpy(mask).long()).pooler_output,
                    image_features=model.get_image_features(
                        pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).pooler_output,
                    text_embeds=out.text_embeds, loss=out.loss, logits_per_image=out.logits_per_image,
                    logit_scale=model.logit_scale)
    want = {k: v.detach().numpy() for k, v in want.items()}
    return cfg, convert.from_hf(state_dict(model), cfg), ids, mask, images, want


def test_embeddings_match_transformers(reference):
    cfg, params, ids, mask, images, want = reference
    assert cfg.text_pooling == ('argmax' if cfg.eos_token_id == 2 else 'eos')
    text = np.asarray(clip.text_features(params, cfg, ids, mask))
    image = np.asarray(clip.image_features(params, cfg, images))
    diffs = {'text_features': np.abs(text - want['text_features']).max(),
             'image_features': np.abs(image - want['image_features']).max(),
             'embed_text': np.abs(clip.embed_text(params, cfg, ids, mask) - want['text_embeds']).max(),
             'embed_image': np.abs(clip.embed_image(params, cfg, images) - clip.l2_normalize(
                 want['image_features'])).max()}
    print(f'pooling={cfg.text_pooling}: max |diff|', {k: f'{v:.1e}' for k, v in diffs.items()})
    assert min(np.abs(want['text_features']).max(), np.abs(want['image_features']).max()) > 0.5  # real signal
    assert max(diffs.values()) < ATOL


def test_pooling_rule_matters(reference):
    """The other rule pools elsewhere on this batch, so the parity above checks the rule."""
    cfg, params, ids, mask, _, want = reference
    other = dataclasses.replace(cfg, pooling='eos' if cfg.text_pooling == 'argmax' else 'argmax')
    got = np.asarray(clip.text_features(params, other, ids, mask))
    assert np.abs(got - want['text_features']).max() > 100 * ATOL


def test_loss_and_clip_score_match_transformers(reference):
    cfg, params, ids, mask, images, want = reference
    batch = {'ids': ids, 'mask': mask, 'images': images[[0, 1, 2, 0]]}
    loss, metrics = jax.jit(clip.contrastive_loss, static_argnums=1)(params, cfg, batch)
    np.testing.assert_allclose(loss, want['loss'], atol=ATOL)
    np.testing.assert_allclose(metrics['logit_scale'], np.exp(want['logit_scale']), rtol=1e-6)
    cos = np.diag(want['logits_per_image']) / np.exp(want['logit_scale'])
    score = clip.clip_score(params, cfg, batch['images'], ids, mask)
    np.testing.assert_allclose(score, 100 * np.maximum(cos, 0), atol=100 * ATOL)


def test_padding_content_is_ignored(reference):
    cfg, params, ids, mask, _, _ = reference
    changed = np.where(mask == 0, 97, ids).astype(np.int32)
    if cfg.text_pooling == 'argmax':
        changed = np.where(mask == 0, 3, ids).astype(np.int32)  # stay below the pooled max id
    np.testing.assert_allclose(clip.text_features(params, cfg, changed, mask),
                               clip.text_features(params, cfg, ids, mask), atol=1e-6)


# --- the converter -------------------------------------------------------------------------

@pytest.fixture(scope='module')
def hf_model():
    return hf_clip(2)


@pytest.mark.parametrize('change, message', [
    (dict(text_mlp_dim=128), r'text_model\.encoder\.layers\.0\.mlp\.fc1\.weight: the checkpoint has shape '
                             r'\(64, 32\) but this ClipConfig expects \(128, 32\); change ClipConfig\.text_mlp_dim'),
    (dict(projection_dim=8), r'text_projection\.weight: .*\(16, 32\).*\(8, 32\); change ClipConfig\.projection_dim'),
    (dict(patch_size=16), r'patch_embedding\.weight: .*\(32, 3, 8, 8\).*\(32, 3, 16, 16\); '
                          r'change ClipConfig\.patch_size'),
    (dict(vision_layers=3), r"vision tower has 2 layers but ClipConfig\.vision_layers=3"),
])
def test_mismatch_names_key_shapes_and_field(hf_model, change, message):
    cfg = dataclasses.replace(convert.config_from_hf(hf_model.config), **change)
    with pytest.raises(convert.WeightMismatch, match=message):
        convert.from_hf(state_dict(hf_model), cfg)


def test_missing_and_unexpected_tensors_are_named(hf_model):
    cfg = convert.config_from_hf(hf_model.config)
    weights = state_dict(hf_model)
    del weights['vision_model.post_layernorm.bias']
    with pytest.raises(ValueError, match=r'lacks vision_model\.post_layernorm\.bias'):
        convert.from_hf(weights, cfg)
    weights = state_dict(hf_model) | {'text_model.pooler.weight': np.zeros((4, 4), np.float32)}
    with pytest.raises(ValueError, match=r"no place in cm3jax CLIP.*'text_model\.pooler\.weight'"):
        convert.from_hf(weights, cfg)


def test_files_and_pretrained_directory_load_alike(hf_model, tmp_path):
    import torch
    from safetensors.numpy import save_file
    cfg = convert.config_from_hf(hf_model.config)
    want = convert.from_hf(state_dict(hf_model), cfg)
    save_file(state_dict(hf_model), str(tmp_path / 'clip.safetensors'))
    # older transformers saved the position_ids buffers; the loader must skip them
    torch.save(hf_model.state_dict() | {'text_model.embeddings.position_ids': torch.arange(16)[None]},
               tmp_path / 'clip.bin')
    for name in ('clip.safetensors', 'clip.bin'):
        jax.tree.map(np.testing.assert_array_equal, convert.load(tmp_path / name, cfg), want)
    hf_model.save_pretrained(tmp_path / 'pretrained')
    cfg2, params = convert.load_pretrained(tmp_path / 'pretrained')
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params, want)


def test_config_from_hf_rejects_mixed_towers():
    with pytest.raises(ValueError, match='different activations'):
        convert.config_from_hf({'text_config': {'hidden_act': 'gelu'}, 'vision_config': {}})
    assert convert.config_from_hf({}) == clip.ClipConfig()  # transformers' defaults are ViT-B/32


# --- the model without a reference ---------------------------------------------------------

@pytest.fixture(scope='module')
def tiny_params():
    return clip.init(TINY, jax.random.key(0))


def test_config_validation():
    with pytest.raises(ValueError, match='text_width=30 is not divisible by text_heads=4'):
        dataclasses.replace(TINY, text_width=30)
    with pytest.raises(ValueError, match='image_size=30 is not a multiple of patch_size=8'):
        dataclasses.replace(TINY, image_size=30)
    with pytest.raises(ValueError, match="activation='relu' is unknown"):
        dataclasses.replace(TINY, activation='relu')
    with pytest.raises(ValueError, match='image_mean has 1 entries but image_channels=3'):
        dataclasses.replace(TINY, image_mean=(0.5,))
    with pytest.raises(ValueError, match='eos_token_id=100 is outside'):
        dataclasses.replace(TINY, eos_token_id=100)
    with pytest.raises(ValueError, match='scan_unroll=0 must be a positive int'):
        dataclasses.replace(TINY, scan_unroll=0)
    with pytest.raises(ValueError, match="text_canon='B'"):
        dataclasses.replace(TINY, text_canon='B')
    with pytest.raises(ValueError, match='text_canon_taps=.* must be distinct ints >= 1'):
        dataclasses.replace(TINY, text_canon='A', text_canon_taps=(0,))


def test_text_canon_layers_start_as_identity_and_read_only_earlier_tokens():
    cfg = dataclasses.replace(TINY, text_canon='AC')
    params = clip.init(cfg, jax.random.key(0))
    layers = params['text']['encoder']['layers']
    assert layers['canon_a']['taps'].shape == (2, 3, 32) and 'canon_a' not in params['vision']['encoder']['layers']
    ids = np.array([[5, 6, 7, 8, 99, 0], [9, 8, 7, 99, 0, 0]])
    mask = ids > 0
    plain = {**params, 'text': {k: v for k, v in params['text'].items() if k != 'encoder'} | {
        'encoder': {'layers': {k: v for k, v in layers.items() if not k.startswith('canon')}}}}
    np.testing.assert_allclose(clip.embed_text(params, cfg, ids, mask), clip.embed_text(plain, TINY, ids, mask),
                               atol=1e-6)  # zero taps: the plain tower
    layers = {**layers, 'canon_a': {'taps': jnp.ones_like(layers['canon_a']['taps'])}}
    moved = {**params, 'text': {**params['text'], 'encoder': {'layers': layers}}}
    out = clip.embed_text(moved, cfg, ids, mask)
    assert not np.allclose(out, clip.embed_text(params, cfg, ids, mask), atol=1e-4)
    # the pooled end token reads earlier tokens only: what follows it (padding) changes nothing
    np.testing.assert_allclose(clip.embed_text(moved, cfg, np.where(mask, ids, 3), mask), out, atol=1e-6)


def test_an_unrolled_scan_gives_the_same_embeddings(tiny_params):
    """scan_unroll changes the loop, not the params' layout or the numbers."""
    images = np.random.default_rng(0).integers(0, 256, (4, TINY.image_size, TINY.image_size, 3), np.uint8)
    ids = np.full((4, 5), 7)
    unrolled = dataclasses.replace(TINY, scan_unroll=TINY.vision_layers)
    np.testing.assert_allclose(clip.embed_image(tiny_params, unrolled, images), clip.embed_image(tiny_params, TINY, images),
                               atol=1e-6)
    np.testing.assert_allclose(clip.embed_text(tiny_params, unrolled, ids), clip.embed_text(tiny_params, TINY, ids),
                               atol=1e-6)


def test_image_checks_and_uint8(tiny_params):
    for shape in ((2, 64, 64, 3), (2, 32, 32, 1), (32, 32, 3)):
        with pytest.raises(ValueError, match=r'expects \[B, 32, 32, 3\] \(image_size=32'):
            clip.embed_image(tiny_params, TINY, jnp.zeros(shape))
    with pytest.raises(ValueError, match='max_len=16'):
        clip.embed_text(tiny_params, TINY, jnp.zeros((1, 17), jnp.int32))
    pixels = np.random.RandomState(0).randint(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    np.testing.assert_allclose(clip.embed_image(tiny_params, TINY, pixels),
                               clip.embed_image(tiny_params, TINY, pixels / np.float32(255)), atol=1e-6)


def test_embed_document_rule():
    rs = np.random.RandomState(0)
    text, image = (np.array(clip.l2_normalize(rs.randn(4, 8).astype(np.float32))) for _ in range(2))
    image[0] = np.nan  # a missing part's row is never read
    has_text = np.array([True, False, True, False])
    has_image = np.array([False, True, True, False])
    docs = np.asarray(clip.embed_document(text, image, has_text, has_image))
    np.testing.assert_allclose(docs[0], text[0], atol=1e-6)
    np.testing.assert_allclose(docs[1], image[1], atol=1e-6)
    both = (text[2] + image[2]) / 2
    np.testing.assert_allclose(docs[2], both / np.linalg.norm(both), atol=1e-6)
    assert not docs[3].any()
    np.testing.assert_allclose(np.linalg.norm(docs[:3], axis=1), 1.0, atol=1e-6)


def test_contrastive_loss_sanity(tiny_params):
    loss_fn = jax.jit(clip.contrastive_loss_from_embeddings)
    eye = jnp.eye(8, 16)
    aligned, _ = loss_fn(eye, eye, jnp.log(1 / 0.07))
    rand = clip.l2_normalize(jax.random.normal(jax.random.key(1), (2, 8, 16)))
    random, metrics = loss_fn(rand[0], rand[1], jnp.log(1 / 0.07))
    assert aligned < 0.01 < random
    assert 0 <= metrics['text_to_image_accuracy'] <= 1
    # the temperature is capped at 100, past which it gets no gradient
    capped = jax.jit(jax.grad(lambda s: loss_fn(rand[0], rand[1], s)[0]))(10.0)
    _, metrics = loss_fn(rand[0], rand[1], 10.0)
    assert capped == 0 and np.isclose(metrics['logit_scale'], 100.0)

    rs = np.random.RandomState(3)
    batch = {'images': rs.rand(4, 32, 32, 3).astype(np.float32),
             'ids': rs.randint(0, 100, (4, 10)).astype(np.int32), 'mask': np.ones((4, 10), np.int32)}
    (loss, metrics), grads = jax.jit(jax.value_and_grad(clip.contrastive_loss, has_aux=True),
                                     static_argnums=1)(tiny_params, TINY, batch)
    assert np.isfinite(loss) and set(metrics) >= {'text_to_image_accuracy', 'image_to_text_accuracy'}
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.isfinite(g).all(), path
    assert grads['logit_scale'] != 0


def test_bfloat16_compute_stays_close(tiny_params):
    images = sample_images()
    low = dataclasses.replace(TINY, dtype=jnp.bfloat16)
    cos = jnp.sum(clip.embed_image(tiny_params, low, images) * clip.embed_image(tiny_params, TINY, images), -1)
    assert clip.embed_image(tiny_params, low, images).dtype == jnp.float32
    assert (cos > 0.99).all()


def test_sharded_init_and_embeddings_match_one_device(tiny_params):
    mesh = parallel.create_mesh((2, 2, 2))
    rules = parallel.DEFAULT_RULES
    variables, _ = params_lib.init_sharded(functools.partial(clip.init_variables, TINY), mesh, rules, jax.random.key(0))
    params = variables['params']
    # sharded draws may fuse the std scaling differently: equal to an ulp, not bitwise
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-9), params, tiny_params)
    sharded = [x for x in jax.tree.leaves(params) if not x.sharding.is_fully_replicated]
    assert len(sharded) >= 20  # both towers' kernels, embeddings and projections are split
    assert params['text']['encoder']['layers']['attn']['wq'].sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp', 'tensor', None)

    rs = np.random.RandomState(4)
    ids, mask = rs.randint(0, 100, (4, 10)).astype(np.int32), np.ones((4, 10), np.int32)
    mask[1, 6:] = 0
    images = rs.rand(4, 32, 32, 3).astype(np.float32)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        batch = parallel.global_batch({'ids': ids, 'mask': mask}, mesh, rules)
        batch['images'] = parallel.global_batch(images, mesh, rules, ('act_batch',))
        text = clip.embed_text(params, TINY, batch['ids'], batch['mask'])
        image = clip.embed_image(params, TINY, batch['images'])
        loss, _ = jax.jit(clip.contrastive_loss, static_argnums=1)(params, TINY, batch)
    assert len(image.sharding.device_set) == 8
    np.testing.assert_allclose(text, clip.embed_text(tiny_params, TINY, ids, mask), atol=1e-5)
    np.testing.assert_allclose(image, clip.embed_image(tiny_params, TINY, images), atol=1e-5)
    want, _ = clip.contrastive_loss(tiny_params, TINY, {'ids': ids, 'mask': mask, 'images': images})
    np.testing.assert_allclose(loss, want, atol=1e-5)
