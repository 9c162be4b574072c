"""Damaged shards, out-of-vocab records and images of every mode: skipped and counted by reason and
shard, stopped with a message when nothing is usable, and never silently wrong."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from cm3jax import text_tokenizer
from cm3jax.data import documents, images, pipeline, prepare, sources
from cm3jax.errors import ConfigError, DataError
from cm3jax.vocab import Vocab
from tests import damage
from tests.helpers import random_vq_params
from tests.test_pipeline import VQ, WORDS, make_docs

SHARDS = [f'shard-{i:05d}.array_record' for i in range(4)]


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
    """400 documents in 4 shards of 100 (about 20 KB each: 4 KiB of damage hits some records, not all)."""
    out = tmp_path_factory.mktemp('prepared')
    tok = text_tokenizer.train_bpe([' '.join(WORDS)] * 20, vocab_size=280)
    vocab = Vocab.build(num_text=tok.num_text, num_image_codes=VQ.num_codes)
    params = random_vq_params(VQ, 8)
    prepare.prepare(make_docs(400), out, vocab=vocab, text_tokenizer=tok, vq_params=params, vq_cfg=VQ,
                    cfg=prepare.PrepareConfig(shard_size=100, batch=64, progress=False))
    return out, vocab, tok, params


def _copy(prepared, dst):
    shutil.copytree(prepared[0], dst)
    return dst


def _cfg(**kw):
    return pipeline.PipelineConfig(**{'seq_len': 48, 'batch': 4, 'seed': 3, 'shuffle': False, **kw})


def _per_shard(p):
    """examples of the first epoch skipped, per shard (shuffle off: example i is record i)."""
    skipped = {name: 0 for name in SHARDS}
    for i in range(p.num_documents):
        if p.example(i) is None:
            skipped[p.records.shard_of(i)] += 1
    return skipped


def test_a_truncated_an_overwritten_and_a_random_shard_are_skipped_and_counted(prepared, tmp_path):
    data = _copy(prepared, tmp_path / 'data')
    damage.truncate(data / SHARDS[1])
    damage.garbage_inside(data / SHARDS[2])
    damage.random_bytes(data / SHARDS[3])
    p = pipeline.Pipeline(data, prepared[1], _cfg())
    assert set(p.records.damaged) == {SHARDS[1], SHARDS[3]}  # the shards whose index is lost

    skipped = _per_shard(p)
    assert skipped[SHARDS[0]] == 0 and skipped[SHARDS[1]] == skipped[SHARDS[3]] == 100
    assert 0 < skipped[SHARDS[2]] < 50, skipped  # records before and after the damage are kept

    while p.position <= 400:  # just past one epoch (its next records are shard 0's again)
        batch = next(p)
        assert batch['inputs'].max() < prepared[1].size
    assert p.skips[f'unreadable shard ({SHARDS[1]})'] == 100
    assert p.skips[f'unreadable shard ({SHARDS[3]})'] == 100
    assert p.skips[f'unreadable record ({SHARDS[2]})'] == skipped[SHARDS[2]]
    report = p.report()
    assert f'100 unreadable shard ({SHARDS[1]})' in report and str(data / SHARDS[3]) in report, report
    # the counts travel with the iterator's checkpointed state
    q = pipeline.Pipeline(data, prepared[1], _cfg())
    q.set_state(json.loads(json.dumps(p.get_state())))
    assert q.skips == p.skips and q.counts == p.counts


def test_data_that_is_all_damaged_stops_with_a_message(prepared, tmp_path):
    data = _copy(prepared, tmp_path / 'random')
    for name in SHARDS:
        damage.random_bytes(data / name)
    with pytest.raises(DataError, match=r'none of the 4 shards in .* can be read .*prepare the data again'):
        pipeline.Pipeline(data, prepared[1], _cfg())

    from array_record.python.array_record_module import ArrayRecordWriter
    data = _copy(prepared, tmp_path / 'garbled')
    for name in SHARDS:  # readable shards, every record garbage
        w = ArrayRecordWriter(str(data / name), 'group_size:1')
        for _ in range(100):
            w.write(b'not a record')
        w.close()
    p = pipeline.Pipeline(data, prepared[1], _cfg())
    with pytest.raises(DataError, match=r'every record in .* is unusable \(10\d corrupt record \(shard-00000'):
        next(p)


def test_an_id_outside_the_vocab_is_skipped_before_the_model(prepared, tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter
    data = _copy(prepared, tmp_path / 'data')
    vocab = prepared[1]
    records = [pipeline.shards_lib.ShardRecords(data, [{'path': SHARDS[0], 'documents': 100}])[i] for i in range(100)]
    segments, is_image, header = documents.decode_record(records[5])
    segments[0] = segments[0].copy()
    segments[0][0] = vocab.size + 7  # e.g. data prepared for a larger vocab, or a bit flipped
    records[5] = documents.encode_record(segments, is_image, header['id'])
    w = ArrayRecordWriter(str(data / SHARDS[0]), 'group_size:1')
    for r in records:
        w.write(r)
    w.close()
    with pytest.raises(documents.CorruptRecord, match=f'holds id {vocab.size + 7} .* the vocab has {vocab.size}'):
        documents.decode_record(records[5], vocab.size)
    p = pipeline.Pipeline(data, vocab, _cfg())
    assert p.example(5) is None and p.example(4) is not None
    for _ in range(30):
        batch = next(p)
        assert batch['inputs'].max() < vocab.size and batch['targets'].max() < vocab.size
    assert p.skips == {f'id outside the vocab ({SHARDS[0]})': 1}


# ---- Images of every mode ----

def _png(path, img, **kw):
    img.save(path, **kw)
    return path


def test_a_16_bit_png_gives_the_codes_of_its_8_bit_twin(prepared, tmp_path):
    grey = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    eight = _png(tmp_path / 'eight.png', Image.fromarray(grey, 'L'))
    sixteen = _png(tmp_path / 'sixteen.png', Image.fromarray(grey.astype(np.uint16) * 257))
    assert Image.open(sixteen).mode in ('I;16', 'I')  # really a 16-bit file
    a, b = sources.decode_image(str(eight), 'eight.png'), sources.decode_image(str(sixteen), 'sixteen.png')
    np.testing.assert_array_equal(a, np.repeat(grey[..., None], 3, -1))
    np.testing.assert_array_equal(b, a)  # not saturated: convert('RGB') made every pixel 255
    encoder = prepare.ImageEncoder(prepared[3], VQ, 2)
    codes = encoder(np.stack([a, b]))
    np.testing.assert_array_equal(codes[0], codes[1])


def _composite(rgb, alpha, bg):
    """The reference: round(c * a + bg * (1 - a)) with a in [0, 1], in float."""
    a = alpha[..., None].astype(np.float64) / 255
    return np.round(rgb.astype(np.float64) * a + np.asarray(bg, np.float64) * (1 - a)).astype(np.uint8)


def test_alpha_palettes_cmyk_and_exif_orientation_give_the_reference_pixels(tmp_path):
    rng = np.random.default_rng(1)
    bg = (10, 200, 30)
    rgba = rng.integers(0, 256, (6, 10, 4), dtype=np.uint8)
    got = sources.decode_image(str(_png(tmp_path / 'rgba.png', Image.fromarray(rgba, 'RGBA'))), 'rgba', background=bg)
    np.testing.assert_array_equal(got, _composite(rgba[..., :3], rgba[..., 3], bg))

    la = rng.integers(0, 256, (6, 10, 2), dtype=np.uint8)
    got = sources.decode_image(str(_png(tmp_path / 'la.png', Image.fromarray(la, 'LA'))), 'la', background=bg)
    np.testing.assert_array_equal(got, _composite(np.repeat(la[..., :1], 3, -1), la[..., 1], bg))

    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    index = rng.integers(0, 16, (6, 10), dtype=np.uint8)
    p = Image.fromarray(index, 'P')
    p.putpalette(palette.reshape(-1).tolist())
    got = sources.decode_image(str(_png(tmp_path / 'p.png', p, transparency=3)), 'p', background=bg)
    np.testing.assert_array_equal(got, _composite(palette[index], np.where(index == 3, 0, 255), bg))
    got = sources.decode_image(str(_png(tmp_path / 'p_opaque.png', p)), 'p')
    np.testing.assert_array_equal(got, palette[index])

    cmyk = rng.integers(0, 256, (6, 10, 4), dtype=np.uint8)
    got = sources.decode_image(str(_png(tmp_path / 'c.tif', Image.fromarray(cmyk, 'CMYK'))), 'cmyk')
    want = (255 - cmyk[..., :3].astype(np.float64)) * (255 - cmyk[..., 3:].astype(np.float64)) / 255
    np.testing.assert_allclose(got, want, atol=1)  # no colour profile: the plain conversion

    shown = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)  # as a viewer displays it
    for tag, stored in ((6, np.rot90(shown, 1)), (3, np.rot90(shown, 2)), (8, np.rot90(shown, -1))):
        exif = Image.Exif()
        exif[0x0112] = tag  # Orientation: rotate the stored pixels to display them
        path = _png(tmp_path / f'exif{tag}.png', Image.fromarray(np.ascontiguousarray(stored)), exif=exif)
        np.testing.assert_array_equal(sources.decode_image(str(path), 'exif'), shown, err_msg=f'orientation {tag}')

    floats = _png(tmp_path / 'f.tif', Image.fromarray(rng.random((6, 10)).astype(np.float32), 'F'))
    with pytest.raises(sources.Skip, match='mode F'):
        sources.decode_image(str(floats), 'f.tif')
    with pytest.raises(ValueError, match='RGB triple'):
        images.background_of((1, 2))


def _folder(root, sizes):
    root.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i, size in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f'img{i}.png')
        lines.append(json.dumps({'image': f'img{i}.png', 'caption': 'a red circle'}))
    (root / 'captions.jsonl').write_text('\n'.join(lines) + '\n')
    return root


def test_native_sizes_skip_and_count_an_odd_image_with_its_path(prepared, tmp_path):
    _, vocab, tok, params = prepared
    src = sources.folder_source(_folder(tmp_path / 'photos', [8, 8, 8, 12, 8]), resize='none')
    kw = dict(vocab=vocab, text_tokenizer=tok, vq_params=params, vq_cfg=VQ,
              cfg=prepare.PrepareConfig(shard_size=2, batch=4, progress=False))
    manifest = prepare.prepare(src, tmp_path / 'out', **kw)
    assert manifest['documents'] == 4 and manifest['odd_size_skipped'] == 1
    assert manifest['odd_size_examples'] == ['img3.png [12, 12, 3]'] and manifest['empty_documents_dropped'] == 0
    # resized as configured instead
    src = sources.folder_source(tmp_path / 'photos', resize=8)
    assert prepare.prepare(src, tmp_path / 'resized', **kw)['documents'] == 5
    # no image of the right size at all: a config to change, not an odd file
    src = sources.folder_source(_folder(tmp_path / 'big', [12, 12]), resize=None)
    with pytest.raises(ConfigError, match=r'shape \(12, 12, 3\) \(img0.png\) .*--config.source.resize'):
        prepare.prepare(src, tmp_path / 'big_out', **kw)


def test_resize_none_from_the_command_line(tmp_path):
    done = damage.cli('config', '--config=configs/data.py:folder', f'--config.source.root={tmp_path}',
                      '--config.source.resize=none', '--config.source.background=(0, 0, 0)')
    assert done.returncode == 0, done.stderr[-2000:]
    assert 'resize: none' in done.stdout and 'background' in done.stdout
    done = damage.cli('config', '--config=configs/data.py:folder', '--config.source.resize=(32, 48)')
    assert done.returncode == 0 and 'resize: !!python/tuple\n  - 32\n  - 48' in done.stdout, done.stdout
    assert images.size_of('none') is None and images.size_of(None) is None and images.size_of('32') == (32, 32)
