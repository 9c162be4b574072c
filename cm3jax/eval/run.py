"""`cm3jax eval`: generate what a suite needs (or read generated images), compute its metrics,
and write ``report.json`` and ``report.md`` (docs/eval.md).

  shapes  captions of unseen Shapes scenes in GenEval-like categories (`cm3jax.eval.shapes`):
          text-to-image judged exactly, FID against the scenes' renders, CLIP score (with
          --retriever), image-to-text judged exactly and by CIDEr-D, and the image tokenizer's
          PSNR, code usage, judge round trip and rFID.
  coco    the user's prepared MS-COCO captions (an image folder + captions.jsonl, or a TFDS
          dataset): FID-30K (--num captions, one image each, against the real images of the
          same captions) and CLIP score; CIDEr-D of written captions on the Karpathy test split
          (--karpathy=dataset_coco.json).
  folder  generated images in a folder with their prompts (captions.jsonl): CLIP score, FID
          against --reference, and the Shapes judge when every prompt is a Shapes caption.

Every figure carries its protocol: extractor, resize, number of samples, seed, sampling.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import pathlib
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from cm3jax.eval import fid

log = logging.getLogger(__name__)

SUITES = ('shapes', 'coco', 'folder')
EXTRACTORS = ('inception', 'clip', 'none')
DEFAULT_NUM = {'shapes': 64, 'coco': 30_000}
# where the Inception file is looked for and reference statistics are cached, unless told
CACHE = pathlib.Path(os.environ.get('CM3JAX_CACHE', '~/.cache/cm3jax')).expanduser()
ROWS = 512  # captions per decode call
KARPATHY_TEST = 5000


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """What `cm3jax eval` was asked. num: Shapes items per category, COCO captions drawn, folder
    images read (None: the suite's default, `DEFAULT_NUM`; all for folder)."""
    suite: str
    workdir: str | None = None
    out: str | None = None
    num: int | None = None
    seed: int = 0
    extractor: str = 'inception'
    inception: str | None = None
    resize: str = 'clean'
    retriever: str | None = None
    images: str | None = None
    captions: str | None = None
    reference: str | None = None
    karpathy: str | None = None
    world: dict = dataclasses.field(default_factory=dict)
    sample: Any = None  # cm3jax.sample.decode.SampleConfig; None: its defaults
    cache_dir: str | None = None


def inception_path(opts: EvalOptions) -> pathlib.Path:
    from cm3jax.eval import inception
    given = opts.inception or os.environ.get('CM3JAX_INCEPTION')
    return pathlib.Path(given).expanduser() if given else CACHE / inception.FILE


def check(opts: EvalOptions) -> None:
    """Refuse a request that cannot run, before anything is loaded."""
    from cm3jax.eval import inception
    if opts.suite not in SUITES:
        raise ValueError(f'--suite={opts.suite!r}; choose one of {SUITES}')
    if opts.extractor not in EXTRACTORS:
        raise ValueError(f'--extractor={opts.extractor!r}; choose one of {EXTRACTORS}')
    if opts.resize not in inception.RESIZES:
        raise ValueError(f'--resize={opts.resize!r}; choose one of {inception.RESIZES}')
    if opts.suite in ('shapes', 'coco') and not opts.workdir:
        raise ValueError(f'--suite={opts.suite} needs --workdir=RUN (a `cm3jax train` run on prepared data)')
    if opts.suite in ('coco', 'folder') and not opts.images:
        raise ValueError(f'--suite={opts.suite} needs --images=DIR (with captions.jsonl) or --images=tfds:NAME:SPLIT')
    if opts.num is not None and opts.num < 1:
        raise ValueError(f'--num={opts.num}: ask for at least one')
    fid_wanted = opts.suite != 'folder' or opts.reference
    if fid_wanted and opts.extractor == 'clip' and not opts.retriever:
        raise ValueError('--extractor=clip needs --retriever=DIR (a retriever workdir or HF CLIP weights)')
    if fid_wanted and opts.extractor == 'inception' and not inception_path(opts).is_file():
        path = inception_path(opts)
        raise FileNotFoundError(f'the Inception weights {path} are missing: FID needs {inception.FILE}; download '
                                f'it yourself from {inception.WHERE} and pass --inception=/path/to/{inception.FILE} '
                                f'(or set CM3JAX_INCEPTION, or --extractor=clip|none; docs/eval.md)')


def extractor_of(opts: EvalOptions) -> fid.FeatureExtractor | None:
    if opts.extractor == 'none':
        return None
    if opts.extractor == 'clip':
        return fid.clip_extractor(opts.retriever, retriever=_retriever(opts.retriever))
    from cm3jax.eval import inception
    return inception.load_inception(inception_path(opts), opts.resize)


def _cache_dir(opts: EvalOptions) -> pathlib.Path:
    return pathlib.Path(opts.cache_dir).expanduser() if opts.cache_dir else CACHE / 'fid'


def _protocol(opts: EvalOptions, n: int, **more) -> dict:
    return {'n': int(n), 'seed': opts.seed, **more}


def _fid_entry(extractor, generated, reference, n: int, opts: EvalOptions, reference_is: str) -> dict:
    mu1, s1, _ = fid.image_statistics(extractor, generated)
    mu2, s2, n_ref = reference
    return {'value': fid.frechet_distance(mu1, s1, mu2, s2), 'n': int(n),
            'protocol': _protocol(opts, n, **extractor.protocol, reference=reference_is, reference_n=n_ref)}


# ---- generation -----------------------------------------------------------------------------------

def _draw(gen, captions: list[str], sample, seed: int, desc: str) -> Iterator[np.ndarray]:
    """UInt8[B, R, R, 3] batches: one image per caption, ``ROWS`` captions per decode call."""
    import jax
    from cm3jax.sample import generate
    for start in tqdm(range(0, len(captions), ROWS), desc=desc, unit='call', leave=False):
        rng = jax.random.fold_in(jax.random.key(seed), start)
        yield generate.text_to_image(gen, captions[start:start + ROWS], num=1, sample=sample, rng=rng)['images'][:, 0]


def _write(gen, images: np.ndarray, desc: str) -> list[str]:
    from cm3jax.sample import generate
    out = []
    for start in tqdm(range(0, len(images), ROWS), desc=desc, unit='call', leave=False):
        out += generate.image_to_text(gen, images[start:start + ROWS], form='continue')
    return out


def _sample(opts: EvalOptions):
    from cm3jax.sample import decode
    return opts.sample or decode.SampleConfig()


def _generator(opts: EvalOptions):
    from cm3jax.sample import load
    return load.load_generator(opts.workdir)


# ---- suites ---------------------------------------------------------------------------------------

def shapes_suite(opts: EvalOptions, extractor) -> dict:
    import flax.linen as nn
    import jax
    from cm3jax.data.worlds import shapes as world_lib
    from cm3jax.eval import cider, shapes
    gen, mesh, rules = _generator(opts)
    cfg = world_lib.ShapesConfig(**{'canvas': gen.vq_cfg.resolution, **opts.world})
    if cfg.canvas != gen.vq_cfg.resolution:
        raise ValueError(f'--world canvas {cfg.canvas} is not the image tokenizer\'s {gen.vq_cfg.resolution}')
    per = opts.num or DEFAULT_NUM['shapes']
    todo = shapes.items(cfg, per, opts.seed)
    truth = shapes.ground_truth(todo)
    sample = _sample(opts)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        drawn = np.concatenate(list(_draw(gen, [it.caption for it in todo], sample, opts.seed, 'draw')))
        seen = [i for i, it in enumerate(todo) if it.split == 'validation']
        written = _write(gen, truth[seen], 'caption')
    draw_protocol = _protocol(opts, len(todo), sample=dataclasses.asdict(sample), per_category=per,
                              world=dataclasses.asdict(cfg))
    metrics = {'text_to_image/judge': {**shapes.score(todo, drawn, cfg), 'protocol': draw_protocol}}
    if extractor is not None:
        reference = fid.cached_statistics(extractor, f'shapes renders {json.dumps(dataclasses.asdict(cfg))} '
                                                     f'per {per} seed {opts.seed}',
                                          lambda: fid.batches(truth), _cache_dir(opts))
        metrics['text_to_image/fid'] = _fid_entry(extractor, fid.batches(drawn), reference, len(drawn), opts,
                                                  'the renders of the captions\' scenes')
    if opts.retriever:
        metrics['text_to_image/clip_score'] = _clip_score(opts, drawn, [it.caption for it in todo], draw_protocol)
    i2t_protocol = _protocol(opts, len(seen), decoding='greedy, continuation form ([image] <break>)',
                             references='5 template captions per scene')
    judged = [shapes.shapes_judge.score(truth[i], w, cfg)['exact'] for i, w in zip(seen, written)]
    refs = {i: shapes.reference_captions(todo[i].scene, i, seed=opts.seed) for i in seen}
    score, _ = cider.cider_d(dict(zip(seen, written)), refs)
    metrics['image_to_text/judge_exact'] = {**shapes.rate(judged), 'protocol': i2t_protocol}
    metrics['image_to_text/cider_d'] = {'value': score, 'n': len(seen), 'protocol': i2t_protocol}
    metrics['tokenizer'] = {**shapes.tokenizer_metrics(gen.vq_params, gen.vq_cfg, truth, [it.caption for it in todo],
                                                       cfg, extractor),
                            'protocol': _protocol(opts, len(truth), images='the renders of the captions\' scenes')}
    return metrics


@functools.lru_cache(maxsize=2)
def _retriever(path: str):
    """One loaded CLIP per path: the FID extractor and the CLIP score share it (and its programs)."""
    from cm3jax.retrieval import load
    return load.load_retriever(path)


def _clip_score(opts: EvalOptions, images, captions, protocol: dict) -> dict:
    from cm3jax.eval.clip_score import clip_score
    result = clip_score(_retriever(opts.retriever), images, captions)
    result.pop('per_item')
    return {**result, 'protocol': {**protocol, 'clip': str(pathlib.Path(opts.retriever).absolute())}}


def _read_pairs(images: str, captions: str | None) -> list[tuple[str, str]]:
    """(image path, caption) of every captions.jsonl line (``image``/``file_name`` and ``caption``/``text``)."""
    path = pathlib.Path(captions) if captions else pathlib.Path(images) / 'captions.jsonl'
    if not path.is_file():
        raise FileNotFoundError(f'{path} is missing: write one JSON object per line, {{"image": "a.jpg", '
                                f'"caption": "..."}}, or pass --captions=FILE')
    pairs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            image = next(rec[k] for k in ('image', 'file_name', 'file') if k in rec)
            caption = next(rec[k] for k in ('caption', 'text') if k in rec)
        except (ValueError, StopIteration, TypeError):
            raise ValueError(f'{path}:{n} is not {{"image": ..., "caption": ...}}: {line[:80]}') from None
        pairs.append((str(pathlib.Path(images) / image), str(caption)))
    if not pairs:
        raise ValueError(f'{path} lists no images')
    return pairs


def _decode(paths: list[str], resolution: int | None) -> np.ndarray:
    from cm3jax.data import sources
    return np.stack([sources.decode_image(p, p, resolution) for p in paths])


def _coco_pairs(opts: EvalOptions, resolution: int) -> tuple[list[str], Any, str]:
    """(captions, a function giving real-image batches, a key naming the data): ``num``
    images drawn by ``seed``, one of their captions each."""
    num = opts.num or DEFAULT_NUM['coco']
    if opts.images.startswith('tfds:'):
        from cm3jax.data import archives
        name, _, split = opts.images[len('tfds:'):].partition(':')
        src = archives.TfdsSource(name, split or 'validation', caption_key='captions.text', resize=resolution)
        docs = [d for _, d in zip(range(num), src)]
        return [d.texts[0] for d in docs], lambda: fid.batches(np.stack([d.images[0] for d in docs])), \
            f'{opts.images} first {len(docs)} at {resolution}'
    by_image: dict[str, list[str]] = {}
    for image, caption in _read_pairs(opts.images, opts.captions):
        by_image.setdefault(image, []).append(caption)
    rng = np.random.default_rng(opts.seed)
    names = sorted(by_image)
    if num > len(names):
        log.warning('--num=%d but %s has %d images: using them all', num, opts.images, len(names))
    chosen = [names[i] for i in rng.permutation(len(names))[:num]]
    captions = [by_image[n][rng.integers(len(by_image[n]))] for n in chosen]

    def real():
        for start in range(0, len(chosen), ROWS):
            yield _decode(chosen[start:start + ROWS], resolution)
    return captions, real, f'{pathlib.Path(opts.images).absolute()} {len(chosen)} seed {opts.seed} at {resolution}'


def coco_suite(opts: EvalOptions, extractor) -> dict:
    import flax.linen as nn
    import jax
    from cm3jax.eval import cider
    gen, mesh, rules = _generator(opts)
    r = gen.vq_cfg.resolution
    captions, real, key = _coco_pairs(opts, r)
    sample = _sample(opts)
    protocol = _protocol(opts, len(captions), sample=dataclasses.asdict(sample),
                         images=f'centre-cropped and resized to {r} (bicubic), as generated')
    metrics = {}
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        drawn = list(_draw(gen, captions, sample, opts.seed, 'draw'))
        if opts.karpathy:
            names, refs = _karpathy(opts)
            written = []
            for start in range(0, len(names), ROWS):
                written += _write(gen, _decode(names[start:start + ROWS], r), 'caption')
    if extractor is not None:
        reference = fid.cached_statistics(extractor, key, real, _cache_dir(opts))
        metrics[f'text_to_image/fid_{len(captions)}'] = _fid_entry(extractor, iter(drawn), reference, len(captions),
                                                                    opts, 'the real images of the same captions')
    if opts.retriever:
        metrics['text_to_image/clip_score'] = _clip_score(opts, np.concatenate(drawn), captions, protocol)
    if opts.karpathy:
        score, _ = cider.cider_d(dict(enumerate(written)), dict(enumerate(refs)))
        metrics['image_to_text/cider_d'] = {'value': score, 'n': len(names), 'protocol': _protocol(
            opts, len(names), split='Karpathy test', decoding='greedy, continuation form ([image] <break>)',
            tokenizer='PTB-style (cm3jax.eval.cider.ptb_tokenize)')}
    return metrics


def _karpathy(opts: EvalOptions) -> tuple[list[str], list[list[str]]]:
    """The test split of Karpathy's dataset_coco.json: image paths under --images, raw sentences."""
    path = pathlib.Path(opts.karpathy)
    if not path.is_file():
        raise FileNotFoundError(f'--karpathy={path}: no such file; pass Karpathy\'s dataset_coco.json')
    data = json.loads(path.read_text())
    names, refs = [], []
    for im in data.get('images', []):
        if im.get('split') != 'test':
            continue
        folder = pathlib.Path(opts.images)
        candidates = [folder / im.get('filepath', '') / im['filename'], folder / im['filename']]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(f'{im["filename"]} of the Karpathy test split is not under {folder}')
        names.append(str(found))
        refs.append([s['raw'] for s in im['sentences']])
    if not names:
        raise ValueError(f'{path} has no images with "split": "test"')
    return names[:KARPATHY_TEST], refs[:KARPATHY_TEST]


def folder_suite(opts: EvalOptions, extractor) -> dict:
    from cm3jax.data.worlds import shapes as world_lib, shapes_judge
    from cm3jax.eval import shapes
    pairs = _read_pairs(opts.images, opts.captions)[:opts.num]
    images = _decode([p for p, _ in pairs], None)
    captions = [c for _, c in pairs]
    protocol = _protocol(opts, len(pairs), images=str(pathlib.Path(opts.images).absolute()))
    metrics = {}
    if extractor is not None and opts.reference:
        ref = pathlib.Path(opts.reference)
        if ref.suffix == '.npz':
            with np.load(ref) as f:
                reference = (f['mu'], f['sigma'], int(f['n']) if 'n' in f.files else -1)
        else:
            files = sorted(p for p in ref.rglob('*') if p.suffix.lower() in ('.png', '.jpg', '.jpeg', '.webp'))
            if not files:
                raise FileNotFoundError(f'--reference={ref} holds no images (png, jpg, webp) and is not a .npz')
            side = images.shape[1]
            reference = fid.cached_statistics(extractor, f'{ref.absolute()} {len(files)} at {side}', lambda: (
                _decode([str(f) for f in files[i:i + ROWS]], side) for i in range(0, len(files), ROWS)),
                _cache_dir(opts))
        metrics['text_to_image/fid'] = _fid_entry(extractor, fid.batches(images), reference, len(images), opts,
                                                  str(ref.absolute()))
    if opts.retriever:
        metrics['text_to_image/clip_score'] = _clip_score(opts, images, captions, protocol)
    cfg = world_lib.ShapesConfig(**{'canvas': images.shape[1], **opts.world})
    try:
        [shapes_judge.parse_caption(c, cfg) for c in captions]
    except ValueError:
        log.info('not every prompt is a Shapes caption: no judge')
    else:
        metrics['text_to_image/judge_exact'] = {
            **shapes.rate([shapes_judge.score(im, c, cfg)['exact'] for im, c in zip(images, captions)]),
            'protocol': protocol}
    return metrics


SUITE_FNS = {'shapes': shapes_suite, 'coco': coco_suite, 'folder': folder_suite}


def run(opts: EvalOptions) -> dict:
    """Run the suite; write ``OUT/report.json`` and ``OUT/report.md`` (OUT: --out, else
    WORKDIR/eval, else IMAGES/eval); returns the report."""
    check(opts)
    extractor = extractor_of(opts) if opts.suite != 'folder' or opts.reference else None
    metrics = SUITE_FNS[opts.suite](opts, extractor)
    report = {'suite': opts.suite, 'workdir': opts.workdir, 'images': opts.images, 'seed': opts.seed,
              'metrics': metrics}
    base = opts.workdir if opts.suite != 'folder' else opts.images
    out = pathlib.Path(opts.out or pathlib.Path(base) / 'eval')
    out.mkdir(parents=True, exist_ok=True)
    (out / 'report.json').write_text(json.dumps(report, indent=1, default=_jsonable))
    from cm3jax.eval import report as report_md
    (out / 'report.md').write_text(report_md.markdown(report))
    print(report_md.markdown(report))
    print(f'wrote {out}/report.json and {out}/report.md')
    return report


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, (tuple, np.ndarray)):
        return list(x)
    return str(x)
