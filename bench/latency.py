"""Per-query latency and peak memory vs shots: vanilla multimodal ICL, AIM without bank, AIM with bank.

One query (batch of 1) answered as evaluation answers it: prompts, left-padded assembly, greedy generation of
4 new tokens with the KV cache. Vanilla ICL puts every demo's image tokens in the prompt; AIM without bank
reads each demo alone with the frozen model (one batched call) and puts its fused tokens in the prompt; AIM
with bank looks the demos' readings up (built once before timing) and only projects them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench import Context, Result, markdown, register, target
from bench.common import Env, PeakMemory, env, interleaved, median

METHODS = {  # name -> (demo mode, bank)
    "vanilla": ("images", False),
    "aim": ("fused", False),
    "aim+bank": ("fused", True),
    # the same number of context tokens as AIM+bank, demos as plain text: what the fused tokens alone cost
    "text": ("text", False),
}
TARGET_SHOTS, TARGET_SPEEDUP, TARGET_MEMORY = 16, 5.0, 4.0


def plan(ctx: Context) -> list[tuple[str, list[int]]]:
    """(variant, shots) measured: LLaVA-1.5 over 0..32 shots; LLaVA-NeXT's 2928-token images up to 16 (32
    shots of vanilla ICL would be 94k positions, minutes per query on a laptop CPU)."""
    if ctx.smoke:
        return [("smoke", [0, 2])]
    if ctx.quick:
        return [("llava-1.5", [0, 4, 16])]
    return [("llava-1.5", [0, 4, 8, 16, 32]), ("llava-next", [0, 4, 8, 16])]


@register("latency", "per-query latency and peak memory vs shots: vanilla ICL, AIM without and with the bank")
def run(ctx: Context) -> Result:
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    builds: dict[str, Any] = {}
    memory = None
    for variant, shots in plan(ctx):
        e = env(ctx, variant)
        memory = PeakMemory(e.device)
        builds[variant] = e.build_bank(ctx.workdir / "bank", max(shots))
        ctx.log(f"  {variant}: {e.image_tokens} image tokens per image, {e.demo_text_tokens} text tokens per demo; "
                f"bank of {max(shots)} demos built in {builds[variant]['build_s']:.2f} s, reloaded lazily from disk "
                f"in {builds[variant]['reload_s'] * 1000:.1f} ms")
        batches = {k: e.batch(k) for k in shots}
        context = {(k, m): e.answer(batches[k], mode, bank) for k in shots for m, (mode, bank) in METHODS.items()}
        timings = {}
        for k in shots:
            calls = {m: _call(e, batches[k], mode, bank) for m, (mode, bank) in METHODS.items()}
            timings[k] = interleaved(calls, ctx.repeats, e.device, budget_s=None if ctx.smoke else 60.0)
            ctx.log(f"  {variant} {k:>2} shots: " + ", ".join(
                f"{m} {1000 * median(t):.1f} ms" for m, t in timings[k].items()))
        peaks = {}
        with memory.precise():
            for k in shots:
                for m, (mode, bank) in METHODS.items():
                    peaks[(k, m)] = memory.measure(_call(e, batches[k], mode, bank))
        for k in shots:
            row: dict[str, Any] = {"model": variant, "image_tokens": e.image_tokens, "shots": k}
            for m in METHODS:
                row[f"{m}_context"] = context[(k, m)]
                row[f"{m}_ms"] = 1000 * median(timings[k][m])
                row[f"{m}_ms_min"] = 1000 * min(timings[k][m])
                row[f"{m}_ms_all"] = [round(1000 * t, 3) for t in timings[k][m]]
                row[f"{m}_peak_mib"] = peaks[(k, m)]
            row["speedup_bank"] = row["vanilla_ms"] / row["aim+bank_ms"]
            row["speedup_aim"] = row["vanilla_ms"] / row["aim_ms"]
            row["bank_vs_aim"] = row["aim_ms"] / row["aim+bank_ms"]
            row["memory_ratio_bank"] = _ratio(row["vanilla_peak_mib"], row["aim+bank_peak_mib"])
            row["memory_ratio_aim"] = _ratio(row["vanilla_peak_mib"], row["aim_peak_mib"])
            rows.append(row)

    targets = _targets(rows)
    table = markdown(rows, [
        ("model", "model", ""), ("image_tokens", "img tok", "d"), ("shots", "shots", "d"),
        ("vanilla_context", "ctx ICL", "d"), ("aim+bank_context", "ctx AIM", "d"),
        ("vanilla_ms", "ICL ms", ".1f"), ("aim_ms", "AIM ms", ".1f"), ("aim+bank_ms", "AIM+bank ms", ".1f"),
        ("speedup_bank", "ICL/AIM+bank", ".1f"), ("speedup_aim", "ICL/AIM", ".1f"),
        ("vanilla_peak_mib", "ICL MiB", ".1f"), ("aim_peak_mib", "AIM MiB", ".1f"),
        ("aim+bank_peak_mib", "AIM+bank MiB", ".1f"), ("text_peak_mib", "text demos MiB", ".1f"),
        ("memory_ratio_bank", "mem ICL/AIM+bank", ".1f"),
    ])
    notes.append("latency: median of per-query wall time (prompt building, assembly, prefill and 4 greedy tokens "
                 "with the KV cache), batch of 1, methods interleaved; peak memory: " +
                 (memory.method if memory else "n/a"))
    notes.append("bank builds (one-time, not in the per-query numbers): " + "; ".join(
        f"{v}: {b['demos']} demos in {b['build_s']:.2f} s ({b['build_ms_per_demo']:.1f} ms/demo), fresh bank "
        f"reloaded lazily from disk in {1000 * b['reload_s']:.1f} ms" for v, b in builds.items()))
    return Result(rows, table, targets, notes, settings={"plan": plan(ctx), "repeats": ctx.repeats,
                                                          "new_tokens": 4, "bank_builds": builds})


def _call(e: Env, batch: dict[str, Any], mode: str, bank: bool) -> Callable[[], int]:
    return lambda: e.answer(batch, mode, bank)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def _targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """On the first model measured (LLaVA-1.5, 576 image tokens), at 16 shots (the most shots a smaller plan has)."""
    main = [r for r in rows if r["model"] == rows[0]["model"]]
    at = {r["shots"]: r for r in main}
    out = []
    k = TARGET_SHOTS if TARGET_SHOTS in at else max(at)
    if k > 0:
        r = at[k]
        where = f"{k} shots x {r['image_tokens']} image tokens"
        out.append(target(f"AIM+bank speed-up over vanilla ICL, {where}", f">= {TARGET_SPEEDUP:.0f}x",
                          r["speedup_bank"], r["speedup_bank"] >= TARGET_SPEEDUP, "x"))
        mem = r["memory_ratio_bank"]
        out.append(target(f"AIM+bank peak activation memory below vanilla ICL, {where}",
                          f">= {TARGET_MEMORY:.0f}x less",
                          mem, None if mem is None else mem >= TARGET_MEMORY, "x"))
    if at and min(at) == 0 and max(at) > 0:
        lo, hi = at[min(at)], at[max(at)]
        bank, text, icl = (_growth(lo, hi, m) for m in ("aim+bank", "text", "vanilla"))
        if bank is not None and text is not None and icl is not None:
            # Flat apart from the fused tokens: from 0 to max shots AIM+bank's peak grows no more than that of the
            # same prompt with the demos as plain text, which has exactly as many context tokens (1 MiB slack for
            # page granularity); vanilla ICL's growth is given for scale.
            out.append(target(
                f"AIM+bank memory flat in shots 0..{max(at)} apart from the fused tokens: its growth vs the growth "
                f"of text-only demos of the same length (vanilla ICL grows {icl:.1f} MiB)",
                "<= 1.25x text demos' growth (+1 MiB)", bank, bank <= 1.25 * max(text, 0.0) + 1.0, "MiB"))
    return out


def _growth(lo: dict[str, Any], hi: dict[str, Any], method: str) -> float | None:
    a, b = lo[f"{method}_peak_mib"], hi[f"{method}_peak_mib"]
    return None if a is None or b is None else b - a
