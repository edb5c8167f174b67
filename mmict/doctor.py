"""`mmict doctor EXP [key=value ...]`: will this experiment run, and run right, on this machine? A verdict per item.

For users with real weights, in minutes: it checks every data and resource path the run needs (the same checks
`train` makes before its first step, `mmict/preflight.py`), loads the backbone, compares the adapter with the HF
model on the model's own processor (logits of the last position and greedy tokens, for a few prompts), prints per
shot count the context each evaluated method needs against the model's limit, estimates memory per batch, and
answers a handful of evaluation queries end to end. Nothing is trained, nothing is written but a scratch folder.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from mmict.preflight import Check, preflight

log = logging.getLogger(__name__)

PROMPTS = ("Question: what is in the image? Short answer:", "Output:", "Describe the picture.")


def _processor(backbone) -> Any:
    """The model's own processor, as a user of transformers would load it."""
    if backbone.family == "blip2":
        from mmict.backbones.blip2 import load_processor

        return load_processor(backbone.name_or_path)
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(backbone.name_or_path)


def adapter_parity(backbone, image, prompts: tuple[str, ...] = PROMPTS, atol: float = 1e-3) -> list[Check]:
    """The adapter's assembly against the HF model on its processor's inputs for [image][text] prompts: the last
    position's logits (decoder-only) and the greedy continuation (every family)."""
    import torch

    from mmict.segments import Image, Text

    try:
        processor = _processor(backbone)
    except Exception as err:  # noqa: BLE001 - a checkpoint without a processor config
        return [Check("adapter vs HF model", False, f"the model's processor does not load: {type(err).__name__}: "
                      f"{err}", "save the processor with the model (processor.save_pretrained)")]
    checks = []
    placeholder = backbone.image_placeholder or ""
    for text in prompts:
        prompt = [Image(backbone.image_transform(image)), Text(text)]
        try:
            inputs = processor(images=[image], text=placeholder + text, return_tensors="pt")
        except Exception as err:  # noqa: BLE001 - an incomplete processor config (e.g. no patch_size)
            return [Check("adapter vs HF model", False, f"the model's processor fails on [image][text]: "
                          f"{type(err).__name__}: {err}", "save the model's full processor with it "
                          "(processor.save_pretrained); a toy backbone: mmict pretrain-toy EXP --force")]
        inputs = {k: v.to(backbone.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        floats = {k: v.to(backbone.dtype) for k, v in inputs.items() if torch.is_tensor(v) and v.is_floating_point()}
        inputs.update(floats)
        item = f"adapter vs HF model: {text!r}"
        with torch.no_grad():
            detail = []
            ok = True
            if not backbone.is_encoder_decoder:
                mine = backbone(backbone.assemble([prompt])).logits[0, -1].float()
                theirs = backbone.model(**inputs).logits[0, -1].float()
                diff = float((mine - theirs).abs().max())
                ok = diff <= atol * max(1.0, float(theirs.abs().max()))
                detail.append(f"last-position logits max |diff| {diff:.2e}")
            ours = backbone.generate([prompt], max_new_tokens=5)[0]
            out = backbone.model.generate(**inputs, max_new_tokens=5, do_sample=False)
            new = out[0] if backbone.is_encoder_decoder else out[0, inputs["input_ids"].shape[1]:]
            hf = backbone.tokenizer.decode(new, skip_special_tokens=True).strip()
            same = ours == hf
            detail.append(f"greedy {'equal' if same else 'DIFFER'}: {ours!r}" + ("" if same else f" vs HF {hf!r}"))
        checks.append(Check(item, ok and same, "; ".join(detail),
                            "" if ok and same else "report it: the adapter must compute what the HF model computes"))
    return checks


@dataclass
class ContextRow:
    mode: str
    shots: int
    tokens: int | None  # the longest prompt plus the answer's tokens (None: measured only when run)


def context_table(module, cfg: DictConfig, task, protocol, pool: list, queries: list
                  ) -> tuple[list[ContextRow], list[Check]]:
    """Per evaluated shot count and demo mode: the prompt length the run will need, against the LM's limit."""
    from mmict.eval.loop import ContextCounter, answer_tokens, demos_shown, trial_modes
    from mmict.prompts import MODE_NAMES, PROMPT_MODE

    counter, limit = ContextCounter(module), module.backbone.max_positions
    extra = answer_tokens(module, task, protocol)
    rows, checks = [], []
    shown = [m for m in module.eval_demo_modes() if m != "none"]
    for k in cfg.eval.shots:
        for mode in trial_modes(k, shown, protocol):
            n = demos_shown(k, mode, protocol)
            if PROMPT_MODE.get(mode, mode) not in module.preflight_modes:
                rows.append(ContextRow(mode, k, None))
                continue
            if n > len(pool):
                rows.append(ContextRow(mode, k, None))
                continue
            demos = [pool[:n]] * len(queries)
            tokens = max(counter.lengths(queries, demos, task, mode, protocol.demo_separator)) + extra
            rows.append(ContextRow(mode, k, tokens))
            if limit is not None:
                name = MODE_NAMES.get(mode, mode)
                checks.append(Check(f"context: {name} at {k} shots", tokens <= limit,
                                    f"{tokens} of {limit} positions", "" if tokens <= limit else
                                    "fewer shots, or eval.demo_image_view=base; the trial is reported as over "
                                    "context, never scored"))
    return rows, checks


def memory_estimate(module, cfg: DictConfig, longest: int) -> Check:
    """Weights plus the KV cache of one evaluation batch at the longest prompt (beams included), against the
    accelerator's free memory where there is one."""
    import torch

    bb = module.backbone
    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    text = getattr(bb.config, "text_config", bb.config)
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "num_layers", 0)
    heads = getattr(text, "num_attention_heads", 1) or 1
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or bb.hidden_size // heads
    beams = cfg.eval.num_beams or 3
    kv = 2 * layers * kv_heads * head_dim * longest * cfg.eval.batch_size * beams * bb.dtype.itemsize
    total = weights + kv
    detail = (f"weights {weights / 2**30:.2f} GiB + KV cache {kv / 2**30:.2f} GiB (batch {cfg.eval.batch_size} x "
              f"{beams} beams x {longest} tokens) = {total / 2**30:.2f} GiB")
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        ok = total < 0.9 * free
        return Check("memory per evaluation batch", ok, f"{detail}; {free / 2**30:.1f} GiB free",
                     "" if ok else "eval.batch_size smaller, or backbone.dtype=bfloat16")
    return Check("memory per evaluation batch", True, f"{detail} (no accelerator: not compared)")


def end_to_end(module, cfg: DictConfig, task, protocol, pool: list, queries: list) -> Check:
    """A handful of queries through the real evaluation loop at the smallest and largest shot counts."""
    from mmict.eval.loop import evaluate

    shots = sorted({min(cfg.eval.shots), max(cfg.eval.shots)})
    try:
        results = evaluate(module, queries, pool, shots=shots, seeds=[0], demo_modes=module.eval_demo_modes(),
                           task=task, batch_size=len(queries), protocol=protocol, progress=False)
    except Exception as err:  # noqa: BLE001 - the verdict names it; the traceback is in the log
        log.exception("end-to-end evaluation failed")
        return Check("end to end", False, f"{type(err).__name__}: {err}", "see the traceback above")
    parts = [f"{r.method}@{r.shots}: " + ("over context" if r.status != "ok" else f"{r.accuracy:.2f}")
             for r in results]
    return Check("end to end", True, f"{len(queries)} queries answered: " + ", ".join(parts))


def doctor(cfg: DictConfig, num_queries: int = 4) -> list[Check]:
    """Every check, in order; the backbone-dependent ones only once the paths are there."""
    from mmict.methods import METHODS
    from mmict.toy.prepare import prepare
    from mmict.train import find_shards_or_fail

    prepare(cfg)  # a toy experiment's world and backbone, built as train builds them
    checks = preflight(cfg, training_shards=lambda: find_shards_or_fail(cfg))
    if any(not c.ok and c.item.startswith(("backbone", "GPU")) for c in checks):
        return checks
    module = METHODS[cfg.method.name](cfg)
    n_params = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    checks.append(Check("backbone loads", True, f"{module.backbone.family}: {module.backbone.name_or_path}, "
                        f"{n_params / 1e6:.1f}M parameters ({trainable / 1e6:.2f}M trainable), "
                        f"LM positions: {module.backbone.max_positions_source}"))
    from mmict.eval.tasks import get_task

    task = get_task(cfg.eval.task, cfg.data.prompt_format)
    if not all(c.ok for c in checks if c.item.startswith("eval shards")):
        return checks
    from data_modules.downstream import DownstreamDataModule
    from mmict.eval.runner import protocol_for
    from mmict.eval.selection import example_image

    dm = DownstreamDataModule(cfg.data.root, folder=task.folder, task=task.name,
                              image_transform=module.backbone.image_transform, num_queries=num_queries)
    dm.setup("test")
    pool, queries = list(dm.pool), list(dm.queries)
    try:
        checks += adapter_parity(module.backbone, example_image(queries[0]))
    except ValueError as err:  # an example without its encoded image: nothing to give the processor
        checks.append(Check("adapter vs HF model", False, str(err), "evaluate from shards (they keep the image)"))
    protocol = protocol_for(cfg, task, module.backbone)
    rows, context_checks = context_table(module, cfg, task, protocol, pool, queries)
    checks += context_checks
    longest = max((r.tokens for r in rows if r.tokens is not None), default=256)
    checks.append(memory_estimate(module, cfg, longest))
    checks.append(end_to_end(module, cfg, task, protocol, pool, queries))
    return checks


def main(argv: list[str] | None = None) -> int:
    from mmict.config import load_config

    parser = argparse.ArgumentParser(prog="mmict doctor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", help="name under experiments/ or a yaml path")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, as for train")
    parser.add_argument("--queries", type=int, default=4, help="queries answered end to end (default 4)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory() as scratch:  # nothing the doctor does lands in runs/
        cfg = load_config(args.experiment, [*args.overrides, f"run_root={Path(scratch) / 'runs'}"])
        checks = doctor(cfg, args.queries)
    print(f"mmict doctor {args.experiment}\n")
    print("\n".join(c.line() for c in checks))
    failed = [c for c in checks if not c.ok]
    print(f"\nverdict: {'ready' if not failed else f'{len(failed)} problem(s): fix them before training'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
