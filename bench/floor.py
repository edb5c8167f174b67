"""The floor: AIM with the bank against prompts of the same length that need no demo reading at all.

With the bank, a demo should cost what its text tokens cost. Two floors, each the same number of context
tokens as AIM's prompt, answered the same way (assembly + prefill + 4 greedy tokens with the KV cache):
- "text demos": the same query (image included), each demo shown as its text only (demo mode "text"): the
  exact price of reading the demos as plain tokens, which is what the bank should bring AIM down to;
- "pure text": a text-only prompt (no image anywhere, no vision tower) of the same number of tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from bench import Context, Result, markdown, register, target
from bench.common import Env, env, interleaved, median
from mmict.segments import Text

TARGET = 1.15


def plan(ctx: Context) -> tuple[str, list[int]]:
    if ctx.smoke:
        return "smoke", [2]
    return "llava-1.5", [16] if ctx.quick else [4, 16, 32]


def pure_text(e: Env, n_tokens: int, new_tokens: int = 4):
    """A call answering a text-only prompt of exactly `n_tokens` context tokens (BOS included)."""
    words = " ".join(["red"] * max(0, n_tokens - 1))
    assembled = e.backbone.assemble([[Text(words)]], padding_side="left")
    if int(assembled.context_tokens) != n_tokens:
        raise RuntimeError(f"pure-text prompt has {int(assembled.context_tokens)} tokens, wanted {n_tokens}")

    def call() -> None:
        with torch.no_grad():
            batch = e.backbone.assemble([[Text(words)]], padding_side="left")
            e.backbone.generate_from(batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens)

    return call


@register("floor", "AIM with the bank vs prompts of the same length that need no demo reading (target <= 1.15x)")
def run(ctx: Context) -> Result:
    variant, shots = plan(ctx)
    e = env(ctx, variant)
    e.build_bank(ctx.workdir / "bank", max(shots))  # already on disk when the latency benchmark ran
    rows: list[dict[str, Any]] = []
    for k in shots:
        batch = e.batch(k)
        n_aim, n_text = e.answer(batch, "fused", True), e.answer(batch, "text", False)
        calls = {"aim+bank": lambda b=batch: e.answer(b, "fused", True),
                 "text demos": lambda b=batch: e.answer(b, "text", False),
                 "pure text": pure_text(e, n_aim)}
        times = interleaved(calls, ctx.repeats, e.device)
        ms = {name: 1000 * median(t) for name, t in times.items()}
        rows.append({"model": variant, "shots": k, "context_aim": n_aim, "context_text_demos": n_text,
                     "aim+bank_ms": ms["aim+bank"], "text_demos_ms": ms["text demos"],
                     "pure_text_ms": ms["pure text"], "vs_text_demos": ms["aim+bank"] / ms["text demos"],
                     "vs_pure_text": ms["aim+bank"] / ms["pure text"],
                     **{f"{name.replace(' ', '_')}_ms_all": [round(1000 * t, 3) for t in ts]
                        for name, ts in times.items()}})
        ctx.log(f"  floor {k:>2} shots: " + ", ".join(f"{n} {v:.1f} ms" for n, v in ms.items()))
    table = markdown(rows, [
        ("model", "model", ""), ("shots", "shots", "d"), ("context_aim", "ctx AIM", "d"),
        ("context_text_demos", "ctx text demos", "d"), ("aim+bank_ms", "AIM+bank ms", ".2f"),
        ("text_demos_ms", "text demos ms", ".2f"), ("pure_text_ms", "pure text ms", ".2f"),
        ("vs_text_demos", "AIM+bank / text demos", ".2f"), ("vs_pure_text", "AIM+bank / pure text", ".2f"),
    ])
    worst_demos = max(r["vs_text_demos"] for r in rows)
    worst_pure = max(r["vs_pure_text"] for r in rows)
    targets = [
        target("AIM+bank vs text-only demos of the same length (query image in both): demo reading nearly free",
               f"<= {TARGET}x at every shot count", worst_demos, worst_demos <= TARGET, "x"),
        target("AIM+bank vs a pure-text forward of the same number of tokens (no vision tower at all)",
               f"<= {TARGET}x at every shot count", worst_pure, worst_pure <= TARGET, "x"),
    ]
    notes = ["the pure-text floor also saves the query image's vision-tower pass, which AIM needs whatever its demos "
             "cost; the text-demos floor isolates the demos"]
    return Result(rows, table, targets, notes, settings={"model": variant, "shots": shots, "repeats": ctx.repeats})
