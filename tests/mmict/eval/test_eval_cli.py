"""`mmict eval` / `make eval`: the command line reaches evaluation with the overrides in order."""

from __future__ import annotations

import mmict.eval.__main__ as eval_cli


def test_overrides_after_shots_are_kept(monkeypatch):
    """`make eval CKPT=... SHOTS=0,4 ARGS="eval.seeds=[0]"` expands to overrides after --shots (they were refused
    with "unrecognized arguments" before the parse was intermixed)."""
    calls = []
    monkeypatch.setattr(eval_cli, "evaluate_checkpoint",
                        lambda ckpt, overrides, out=None: calls.append((ckpt, overrides)))
    monkeypatch.setattr(eval_cli, "evaluate_baselines", lambda exp, overrides: calls.append((exp, overrides)))
    eval_cli.main(["runs/x/checkpoints/last.ckpt", "--shots", "0,4", "eval.seeds=[0]"])
    eval_cli.main(["--exp", "toy_aim", "eval.demo_modes=[images,text]", "--shots", "0,2", "eval.seeds=[0,1]"])
    assert calls == [("runs/x/checkpoints/last.ckpt", ["eval.seeds=[0]", "eval.shots=[0,4]"]),
                     ("toy_aim", ["eval.demo_modes=[images,text]", "eval.seeds=[0,1]", "eval.shots=[0,2]"])]
