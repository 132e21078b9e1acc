"""Data layer: named image/text sources as numpy arrays, pinned registry assets, a sharded batch iterator.

Importing this package is light: tensorflow-datasets is imported only when a `tfds:` source is loaded.
"""
from gen_jax.data import assets
from gen_jax.data.images import ImageData, load_images
from gen_jax.data.iterator import BatchIterator
from gen_jax.data.text import CharVocab, TextData, lm_windows, load_text, split_sentences

__all__ = ["assets", "ImageData", "load_images", "TextData", "load_text", "CharVocab", "lm_windows",
           "split_sentences", "BatchIterator"]
