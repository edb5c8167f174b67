"""The toy world: a synthetic world of coloured shapes in which every method of mmict can be trained and
compared on a CPU in minutes, with nothing downloaded.

- `language.py`: its colours, shapes, positions, text templates and nonsense-word pools (imports nothing of
  mmict: the evaluation tasks and the data writers both use it);
- `world.py`: draws the images and writes the web-corpus, VQA and binding shards (`write_toy_world`);
- `binding.py`: concept-binding episodes (nonsense words bound to images for one episode);
- `concept.py`: concept-induction episodes (a hidden two-value rule labels images yes / no);
- `pretrain_data.py`: the stream the toy backbone is pretrained on;
- `backbone.py`: the tiny LLaVA, cached on disk with its recipe (`ensure_toy_backbone`, which builds either family);
- `tokenizer.py`: the toy tokenizer both toy backbones share;
- `blip2.py`, `qformer_stage.py`: the tiny BLIP-2 and BLIP-2's stage 1 (its Q-Former with a text branch);
- `pretrain.py`: the two-stage pretraining recipe; `probes.py`: the in-context probes saved with it;
- `prepare.py`: `prepare(cfg)`, called by train / eval before anything loads.
"""
