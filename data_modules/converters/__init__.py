"""Converters from public dataset layouts to webdataset shards: `mmict data convert <dataset> --in --out`.

One module per family registers its converters (`common.register`): web corpora (`web`), VQA-style
question/answer sets (`vqa`), caption sets (`captions`), Hateful Memes (`hateful_memes`), video sets
(`video`); OBELICS' ``--url-map`` is read by `url_map`. The shard formats they write are the ones
docs/data.md ("Sample formats") describes.
"""

from . import captions, hateful_memes, video, vqa, web  # noqa: F401  (registers the converters)
from .common import CONVERTERS, ConvertError, ConvertOptions, Summary, convert

__all__ = ["CONVERTERS", "ConvertError", "ConvertOptions", "Summary", "convert"]
