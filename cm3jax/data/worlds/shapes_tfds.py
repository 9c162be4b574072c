"""`cm3jax_shapes`: the Shapes world as a TFDS dataset (ArrayRecord files, built without TensorFlow).

    from cm3jax.data.worlds import shapes_tfds    # registers the builder
    shapes_tfds.Cm3jaxShapes(data_dir=d, split_sizes={'train': 100}).download_and_prepare()
    src = tfds.data_source('cm3jax_shapes', data_dir=d, split='train')   # random access, numpy
    src[i]  # {'image': uint8 [S, S, 3], 'caption': bytes, 'scene': bytes (JSON of Scene.to_dict())}

Record i of a split is `shapes.scene_document(world, seed, i, split)`: the writer's shuffling is
off, so the files and the procedural world agree index by index. Kept out of `shapes` so that
the world imports without tensorflow_datasets (the [tf] extra).
"""

from __future__ import annotations

import dataclasses
import io
import json

import tensorflow_datasets as tfds
from PIL import Image

from cm3jax.data.worlds import shapes

DEFAULT_SPLIT_SIZES = (('train', 2000), ('validation', 200), ('held_out', 200))


@dataclasses.dataclass(eq=False)
class ShapesBuilderConfig(tfds.core.BuilderConfig):
    """world: the scene distribution; seed: of every scene; split_sizes: (split, examples) pairs,
    splits from `shapes.SPLITS`."""
    world: shapes.ShapesConfig = shapes.DEFAULT
    seed: int = 0
    split_sizes: tuple[tuple[str, int], ...] = DEFAULT_SPLIT_SIZES


class Cm3jaxShapes(tfds.core.GeneratorBasedBuilder):
    """Procedural scenes of coloured shapes with captions (cm3jax.data.worlds.shapes)."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Initial release.'}
    BUILDER_CONFIGS = [ShapesBuilderConfig(name='default', description='32x32, 1-3 objects')]

    def __init__(self, *, split_sizes: dict[str, int] | None = None, seed: int | None = None, **kwargs):
        """split_sizes / seed override the builder config's (e.g. a small build for a test);
        only building reads them: a reader takes the split sizes from the files."""
        self._split_sizes = split_sizes
        self._seed = seed
        kwargs.setdefault('file_format', 'array_record')
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.world.canvas
        # DatasetInfo(builder=self): `dataset_info_from_configs` looks for package metadata that a
        # single-module builder does not have.
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(s, s, 3), encoding_format='png'),
                'caption': tfds.features.Text(),
                'scene': tfds.features.Text(),
            }),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        sizes = dict(self.builder_config.split_sizes)
        if self._split_sizes is not None:
            unknown = set(self._split_sizes) - set(shapes.SPLITS)
            if unknown:
                raise ValueError(f'split_sizes: unknown splits {sorted(unknown)}; known: {shapes.SPLITS}')
            sizes = {k: int(v) for k, v in self._split_sizes.items()}
        return {split: self._generate_examples(split, n) for split, n in sizes.items() if n > 0}

    def _generate_examples(self, split: str, n: int):
        cfg = self.builder_config
        seed = cfg.seed if self._seed is None else self._seed
        for i in range(n):
            doc = shapes.scene_document(cfg.world, seed, i, split)
            text, image = doc.segments
            # PNG bytes, not an array: tfds encodes numpy images with TensorFlow.
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format='PNG')
            yield i, {'image': buf.getvalue(), 'caption': text, 'scene': json.dumps(doc.meta['scene'])}
