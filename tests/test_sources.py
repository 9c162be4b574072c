"""Data sources: documents out, corrupt records skipped and counted, shards disjoint."""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from cm3jax.data import sources
from cm3jax.data.archives import tfds_source, webdataset_source
from cm3jax.data.sources import digits_source, folder_source, make_source, shapes_source


def png_bytes(color, size=(12, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new('RGB', size, color).save(buf, format='PNG')
    return buf.getvalue()


def jpg_bytes(color, size=(12, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new('RGB', size, color).save(buf, format='JPEG')
    return buf.getvalue()


# ---- digits ----

def test_digits_captions_and_images():
    src = digits_source('train', size=32)
    docs = list(src)
    test = digits_source('test', size=16, seed=None)
    assert len(docs) == len(src) and len(src) + len(test) == 1797
    assert src.report() == f'read {len(docs)} documents, skipped 0'
    for d in docs[:50]:
        caption, image = d.segments
        assert image.dtype == np.uint8 and image.shape == (32, 32, 3)
        assert caption == 'a handwritten digit ' + sources.NUMBER_WORDS[d.meta['label']]
    assert 'a handwritten digit seven' in {d.texts[0] for d in docs}
    # the split is fixed whatever the seed; the seed only orders it
    test_ids = [d.id for d in test]
    assert not set(test_ids) & {d.id for d in docs}
    assert sorted(d.id for d in digits_source('test', seed=5)) == sorted(test_ids)
    assert [d.id for d in digits_source('train', size=32)][:20] == [d.id for d in docs[:20]]
    assert next(iter(test)).images[0].shape == (16, 16, 3)
    # pixels follow sklearn's 0..16 intensities
    from sklearn.datasets import load_digits
    d = docs[0]
    raw = load_digits().images[d.meta['index']]
    near = digits_source('train', size=8, resample='nearest')
    first = next(iter(near))
    assert first.id == d.id
    np.testing.assert_array_equal(first.images[0][..., 0], np.round(raw * 255 / 16).astype(np.uint8))


def test_shard_disjoint_and_covering():
    src = digits_source('test')
    full = [d.id for d in src]
    parts = [[d.id for d in src.shard(i, 3)] for i in range(3)]
    assert sorted(sum(parts, [])) == sorted(full)
    assert parts[1] == full[1::3]
    # shards of shards compose: shard 1 of 2, then shard 0 of 3 -> ordinals 1, 7, 13, ...
    assert [d.id for d in src.shard(1, 2).shard(0, 3)] == full[1::6]
    with pytest.raises(ValueError, match='0 <= index < count'):
        src.shard(3, 3)


# ---- folder ----

@pytest.fixture
def folder(tmp_path):
    good = png_bytes('red')
    (tmp_path / 'a.png').write_bytes(good)
    noise = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(noise, format='PNG')
    (tmp_path / 'b.png').write_bytes(noise.getvalue()[:6000])  # truncated inside its pixel data
    with Image.open(tmp_path / 'b.png') as img:  # the header still reads: only load() fails
        assert img.size == (64, 64)
    (tmp_path / 'c.png').write_bytes(b'not an image at all')
    Image.new('RGBA', (40, 20), (0, 0, 255, 128)).save(tmp_path / 'd.png')
    (tmp_path / 'sub').mkdir()
    (tmp_path / 'sub' / 'e.jpg').write_bytes(jpg_bytes('green'))
    lines = [json.dumps({'image': 'a.png', 'caption': 'a red thing'}),
             json.dumps({'image': 'b.png', 'caption': 'truncated'}),
             '{"image": "c.png", "caption": broken json',
             '',
             json.dumps({'image': 'c.png', 'caption': 'garbage'}),
             json.dumps({'file_name': 'd.png', 'text': 'a blue thing'}),
             json.dumps({'image': 'missing.png', 'caption': 'gone'}),
             json.dumps({'image': 'sub/e.jpg', 'caption': 'a green thing'}),
             json.dumps({'image': 'a.png'}),
             json.dumps([1, 2])]
    (tmp_path / 'captions.jsonl').write_text('\n'.join(lines) + '\n')
    return tmp_path


def test_folder_skips_truncated_png_and_bad_json(folder, caplog):
    src = folder_source(folder)
    with caplog.at_level('WARNING', logger='cm3jax.data.sources'):
        docs = list(src)
    assert [d.texts[0] for d in docs] == ['a red thing', 'a blue thing', 'a green thing']
    assert [d.id for d in docs] == ['a.png', 'd.png', 'sub/e.jpg']
    assert docs[0].images[0].shape == (8, 12, 3) and docs[0].images[0].dtype == np.uint8
    assert (docs[0].images[0] == [255, 0, 0]).all()
    assert docs[1].images[0].shape == (20, 40, 3)
    s = src.stats
    assert (s.read, s.skipped) == (3, 6)
    assert s.reasons == {'undecodable image': 2, 'bad json line': 2, 'missing image': 1, 'missing caption': 1}
    assert s.examples['undecodable image'] == ['b.png', 'c.png']
    assert s.examples['bad json line'] == ['captions.jsonl:3', 'captions.jsonl:10']
    report = src.report()
    assert report.startswith('read 3 documents, skipped 6: 2 undecodable image (b.png, c.png), '
                             '2 bad json line (captions.jsonl:3, captions.jsonl:10)')
    assert '1 missing image (missing.png)' in report
    # one warning per reason, plus the end-of-pass summary
    warnings = [r.getMessage() for r in caplog.records]
    assert sum('skipping undecodable image' in w for w in warnings) == 1
    assert any(report in w for w in warnings)
    # a second pass starts fresh stats
    assert len(list(src)) == 3 and src.stats.skipped == 6


def test_folder_resize_centre_crop(tmp_path):
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :10] = 255  # white left quarter, cut away by the centre crop
    Image.fromarray(img).save(tmp_path / 'w.png')
    (tmp_path / 'captions.jsonl').write_text(json.dumps({'image': 'w.png', 'caption': 'wide'}) + '\n')
    [doc] = list(folder_source(tmp_path, resize=10))
    assert doc.images[0].shape == (10, 10, 3)
    assert doc.images[0].max() < 30
    [doc] = list(folder_source(tmp_path, resize=(8, 24)))
    assert doc.images[0].shape == (8, 24, 3)
    with pytest.raises(FileNotFoundError, match='captions.jsonl'):
        folder_source(tmp_path / 'nowhere')


# ---- webdataset ----

def write_tar(path, members):
    with tarfile.open(path, 'w') as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


@pytest.fixture
def shards(tmp_path):
    write_tar(tmp_path / 'shard-000.tar', [
        ('000.jpg', jpg_bytes('red')), ('000.txt', b'a red square'),
        ('001.png', png_bytes('blue')), ('001.json', json.dumps({'caption': 'a blue square'}).encode()),
        ('002.jpg', b'\xff\xd8 corrupt jpeg'), ('002.txt', b'broken'),
        ('003.jpg', jpg_bytes('green')),  # no caption
        ('dir/004.png', png_bytes('white')), ('dir/004.seg.png', b'a mask field, ignored'),
        ('dir/004.txt', b'  in a dir  ')])
    write_tar(tmp_path / 'shard-001.tar', [
        ('010.txt', b'no image'),
        ('011.png', png_bytes('black')), ('011.json', b'{"caption": '),
        ('012.png', png_bytes('gray')), ('012.txt', b'a gray square')])
    full = (tmp_path / 'shard-000.tar').read_bytes()
    with tarfile.open(tmp_path / 'shard-000.tar') as tf:
        cut = tf.getmember('002.jpg').offset_data + 5
    (tmp_path / 'shard-002.tar').write_bytes(full[:cut])  # truncated inside sample 002's image
    return tmp_path


def test_webdataset_skips_corrupt_members(shards):
    src = webdataset_source([shards / 'shard-000.tar', str(shards / 'shard-001.tar')])
    docs = list(src)
    assert [d.texts[0] for d in docs] == ['a red square', 'a blue square', 'in a dir', 'a gray square']
    assert docs[2].id == 'shard-000.tar:dir/004'
    assert all(d.images[0].dtype == np.uint8 and d.images[0].shape == (8, 12, 3) for d in docs)
    assert src.stats.reasons == {'undecodable image': 1, 'missing caption': 1, 'missing image': 1, 'bad json': 1}
    assert src.stats.examples['undecodable image'] == ['shard-000.tar:002']
    assert src.report().startswith('read 4 documents, skipped 4: 1 undecodable image (shard-000.tar:002)')


def test_webdataset_truncated_tar_and_shards(shards):
    src = webdataset_source(str(shards / '*.tar'), resize=4)
    docs = list(src)
    assert src.stats.reasons['unreadable tar'] == 1 and src.stats.examples['unreadable tar'] == ['shard-002.tar']
    assert all(d.images[0].shape == (4, 4, 3) for d in docs)
    # the truncated tar's samples before the break are kept
    assert [d.id for d in docs if d.meta['tar'] == 'shard-002.tar'] == ['shard-002.tar:000', 'shard-002.tar:001']
    parts = [list(src.shard(i, 3)) for i in range(3)]
    assert sorted(d.id for p in parts for d in p) == sorted(d.id for d in docs)
    assert {d.meta['tar'] for d in parts[1]} == {'shard-001.tar'}
    with pytest.raises(ValueError, match='at least as many tars'):
        src.shard(0, 4)
    with pytest.raises(ValueError, match='no tar files'):
        webdataset_source(str(shards / 'nothing-*.tar'))


# ---- TFDS ----

def test_tfds_round_trip(tmp_path):
    tfds = pytest.importorskip('tensorflow_datasets')

    # unregistered: tfds_source must read it from its files alone, as a user's process would
    class TinyCaptions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version('1.0.0')

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(None, None, 3)),
                'captions': tfds.features.Sequence({'text': tfds.features.Text()}),
                'label': tfds.features.ClassLabel(num_classes=3)}))

        def _split_generators(self, dl_manager):
            return {'train': self._generate_examples(5), 'test': self._generate_examples(2)}

        def _generate_examples(self, n):
            for i in range(n):
                img = np.full((6, 10, 3), 40 * i, np.uint8)
                yield i, {'image': png_bytes(tuple(img[0, 0].tolist()), (10, 6)),
                          'captions': {'text': [f'caption {i} a', f'caption {i} b']}, 'label': i % 3}

    TinyCaptions(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
    src = tfds_source('tiny_captions', 'train', data_dir=tmp_path, caption_key='captions.text')
    docs = list(src)
    assert len(src) == 5 and src.report() == 'read 5 documents, skipped 0'
    assert sorted(d.texts[0] for d in docs) == [f'caption {i} a' for i in range(5)]
    for d in docs:
        i = int(d.texts[0].split()[1])
        assert d.images[0].shape == (6, 10, 3) and d.images[0].dtype == np.uint8
        assert (d.images[0] == 40 * i).all()
    every = list(tfds_source('tiny_captions', 'test', data_dir=tmp_path, caption_key='captions.text',
                             captions='all', resize=4))
    assert len(every) == 4 and every[0].images[0].shape == (4, 4, 3) and every[1].id.endswith('#1')
    labelled = tfds_source('tiny_captions', 'train', data_dir=tmp_path,
                           caption_key=lambda ex: f'class {ex["label"]}')
    assert sorted(d.texts[0] for d in labelled) == ['class 0', 'class 0', 'class 1', 'class 1', 'class 2']
    assert [d.texts[0] for d in src.shard(1, 2)] == [docs[1].texts[0], docs[3].texts[0]]
    missing = tfds_source('tiny_captions', 'train', data_dir=tmp_path, caption_key='caption')
    assert list(missing) == [] and missing.stats.reasons == {'missing caption': 5}
    with pytest.raises(ValueError, match='prepare it first'):
        tfds_source('tiny_captions', 'train', data_dir=tmp_path / 'empty')


# ---- Shapes ----

def test_shapes_source():
    from cm3jax.data.worlds import shapes
    src = shapes_source(split='train', seed=0, count=6)
    docs = list(src)
    assert len(docs) == 6 and src.report() == 'read 6 documents, skipped 0'
    expected = shapes.scene_document(shapes.ShapesConfig(), 0, 3, 'train')
    assert docs[3].texts == expected.texts
    np.testing.assert_array_equal(docs[3].images[0], expected.images[0])
    assert [d.texts for d in src.shard(1, 2)] == [d.texts for d in docs[1::2]]
    endless = iter(shapes_source(count=None))
    assert len([next(endless) for _ in range(3)]) == 3
    # a config as a dict (lists from a config file), through make_source
    small = make_source({'kind': 'shapes', 'cfg': {'canvas': 16, 'sizes': [['small', 2], ['large', 3]]},
                         'split': 'held_out', 'count': 2})
    assert [d.images[0].shape for d in small] == [(16, 16, 3)] * 2 and small.stats.read == 2


# ---- make_source ----

def test_make_source(folder):
    src = make_source({'kind': 'digits', 'split': 'test', 'size': 8})
    assert isinstance(src, sources.DigitsSource) and next(iter(src)).images[0].shape == (8, 8, 3)
    import ml_collections
    cfg = ml_collections.ConfigDict({'kind': 'folder', 'root': str(folder), 'shard': (0, 2)})
    assert [d.id for d in make_source(cfg)] == ['a.png', 'd.png', 'sub/e.jpg']
    with pytest.raises(ValueError, match=r"choose one of \['digits', 'folder', 'shapes', 'tfds', 'webdataset'\]"):
        make_source({'kind': 'imagenet'})
    with pytest.raises(ValueError, match=r"does not take \['colour'\]"):
        make_source({'kind': 'digits', 'colour': 'red'})
