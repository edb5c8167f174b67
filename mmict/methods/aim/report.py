"""AIM's report beside the methods table: how much of vanilla ICL's gain AIM keeps, the context it saves, and the
shots it was trained on against the shots it is evaluated at."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mmict.methods.aim.shots import summary
from mmict.prompts import MODE_NAMES


def trained_shots_of(module: Any) -> dict[int, int] | None:
    """A module's histogram of demos per training episode (`AIMModule.trained_shots`); None for a module that
    keeps none."""
    trained_shots = getattr(module, "trained_shots", None)
    return trained_shots() if callable(trained_shots) else None


def trained_shots_line(trained: dict[int, int] | None, shots: Sequence[int]) -> list[str]:
    """The line above a table that says what k training realised, flagging the evaluated shot counts above the
    largest trained one; no line when the histogram is unknown."""
    if not trained:
        return []
    top = max(trained)
    beyond = sorted({int(k) for k in shots if k > top})
    return [f"Trained on k demos per episode: {summary(trained)}; evaluated shots above {top}: "
            + (f"{beyond} (beyond training)" if beyond else "none")]


def aim_vs_icl(rows: Sequence[dict]) -> list[dict]:
    """Per shot count: the share of vanilla ICL's gain over zero-shot that AIM keeps, and the context saved.

    `recovered` = (AIM - zero-shot) / (vanilla ICL - zero-shot), None when ICL gains nothing;
    `context_ratio` = vanilla ICL's context tokens / AIM's (whole prompt, query included);
    `demo_context_ratio` = the same for the demonstrations' tokens alone (prompt minus the no-demo one; None when
    only OpenFlamingo's 0-shot, which shows 2 text demos, was run).
    The zero-shot baseline is the no-demo row where there is one, else OpenFlamingo's 0-shot (`baseline` says
    which). A row that is not comparable (over the LM's context, or unscored) never enters a ratio: that shot count
    is left out.
    """
    # By report name: a companion's rows (MMICT's own "fused" mode) carry other names.
    by = {(r["method"], r["shots"]): r for r in rows}
    zero = by.get((MODE_NAMES["none"], 0)) or by.get((MODE_NAMES["zero_shot_text"], 0))
    if zero is None or not _comparable(zero):
        return []
    true_zero = zero["method"] == MODE_NAMES["none"]
    out = []
    for k in sorted({r["shots"] for r in rows if r["shots"] > 0}):
        aim, icl = by.get((MODE_NAMES["fused"], k)), by.get((MODE_NAMES["images"], k))
        if aim is None or icl is None or not (_comparable(aim) and _comparable(icl)):
            continue
        gain = icl["accuracy_mean"] - zero["accuracy_mean"]
        demo_aim = aim["context_tokens"] - zero["context_tokens"]
        out.append({
            "shots": k,
            "baseline": zero["method"],
            "recovered": (aim["accuracy_mean"] - zero["accuracy_mean"]) / gain if gain > 0 else None,
            "context_ratio": icl["context_tokens"] / aim["context_tokens"],
            "demo_context_ratio": (icl["context_tokens"] - zero["context_tokens"]) / demo_aim
            if true_zero and demo_aim > 0 else None,
        })
    return out


def _comparable(row: dict) -> bool:
    return row.get("status", "ok") == "ok" and row.get("accuracy_mean") is not None


def aim_vs_icl_markdown(comparison: Sequence[dict]) -> str:
    baseline = comparison[0]["baseline"] if comparison else "zero-shot"
    lines = [f"| shots | AIM's share of vanilla ICL's gain over {baseline} | context tokens, ICL / AIM "
             "| demo tokens, ICL / AIM |", "|---:|---:|---:|---:|"]
    for c in comparison:
        rec = "n/a (ICL gains nothing)" if c["recovered"] is None else f"{100 * c['recovered']:.0f}%"
        demo = "n/a" if c["demo_context_ratio"] is None else f"{c['demo_context_ratio']:.1f}x"
        lines.append(f"| {c['shots']} | {rec} | {c['context_ratio']:.1f}x | {demo} |")
    return "\n".join(lines)
