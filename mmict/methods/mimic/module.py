"""MimIC (Jiang et al. 2025, "Mimic In-Context Learning for Multimodal Tasks"; Kamichanw/MimIC) as a LightningModule.

A frozen backbone whose attention heads get a learnt, query-dependent shift before each layer's output projection
(`shift.MimICShift` through the hook of `mmict.backbones.head_shift`); the shifts are the only parameters that train
and the only ones a checkpoint holds. Each training episode runs twice (reference `src/shift_model.py` lines 193-285):

1. the teacher: the same frozen model, shifts off, under no_grad, on the vanilla ICL prompt (`build_prompt` with
   demo mode "images": the episode's k demos, then the query and its answer);
2. the student: the query and its answer alone (demo mode "none"), shifts on.

loss = ce_loss_weight * CE(student, answer) + align_loss_weight * MSE(student's, teacher's feed-forward outputs),
the MSE over every layer at the query's positions (from the query image to the answer's end; the teacher's demos are
not compared), averaged per episode, then over the batch (reference lines 121-179; weights 0.5 and 1,
`src/config/peft/mimic.yaml`). Deliberate differences, documented in docs/methods.md#mimic: the CE is on the answer's
tokens (the reference's labels are the whole query sequence), and the gate's queries and keys are taken before
rotary embedding (`mmict.backbones.head_shift`).

At evaluation the shifts stay on and no demos are shown: its rows are 0-shot prompts (context tokens = zero-shot's),
named so in every table (`mode_labels`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from data_modules.shots import shots_label
from mmict.backbones import Backbone
from mmict.backbones.head_shift import HeadShift, head_sites, recorded_outputs
from mmict.batch import EpisodeBatch
from mmict.methods.base import FrozenBackboneModule
from mmict.methods.mimic.shift import MimICShift
from mmict.segments import Image, Prompt


class MimICModule(FrozenBackboneModule):
    train_demo_mode = "none"  # the student's prompt; the teacher's is `method.mimic.teacher_demo_mode`
    default_eval_modes: tuple[str, ...] = ("none",)  # no demos at evaluation: scored at 0 shots only
    task_specific = True  # the shifts are learnt from one task's teacher: a companion is evaluated on that task alone

    def __init__(self, config: DictConfig | dict, backbone: Backbone | None = None) -> None:
        super().__init__(config, backbone)
        m = self.cfg.method.mimic
        self.ce_loss_weight, self.align_loss_weight = float(m.ce_loss_weight), float(m.align_loss_weight)
        self.teacher_demo_mode = m.teacher_demo_mode
        self.sites = head_sites(self.backbone.attention_layers())
        heads = {(s.num_heads, s.head_dim) for s in self.sites}
        if len(heads) != 1:
            raise ValueError(f"MimIC needs every layer to have the same heads; {self.backbone.name_or_path} has "
                             f"(heads, head size) {sorted(heads)}")
        (num_heads, head_dim), = heads
        self.shift = MimICShift(len(self.sites), num_heads, head_dim)
        # Attached for the module's life: training's student, evaluation's generate and likelihoods all run shifted;
        # the teacher pass suspends it.
        self.head_shift = HeadShift(self.sites, self.shift, causal=bool(m.causal_normaliser)).attach()
        self._parts: dict[str, torch.Tensor] = {}

    @property
    def mode_labels(self) -> dict[str, str]:  # type: ignore[override]
        return {"none": f"MimIC (no demos at eval, {shots_label(self.cfg.data)}-shot teacher)",
                "images": "vanilla ICL (images+text; MimIC's shifts off)",
                "text": "text-only demos (MimIC's shifts off)"}

    def batch_prompts(self, batch: EpisodeBatch, demo_mode: str | None = None,
                      with_target: bool = True) -> list[Prompt]:
        """The prompts of `demo_mode`, and the shifts switched to match for the forwards that follow, as LIVE's
        vectors are: on for the no-demo prompt (MimIC's), off when demos are shown (the frozen model's vanilla ICL,
        eval.demo_modes=[none,images]; the teacher). Evaluation runs a trial's forwards right after building its
        prompts (mmict/eval/loop.py)."""
        mode = demo_mode or self.train_demo_mode
        self.head_shift.enabled = mode == "none"
        return super().batch_prompts(batch, mode, with_target)

    # ---- the losses -------------------------------------------------------------------------------
    def loss(self, batch: EpisodeBatch, demo_mode: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the weighted MimIC loss, context tokens per query of the student's prompt)."""
        parts, ctx = self.losses(batch)
        self._parts = parts  # its terms, logged by training_step
        return parts["loss"], ctx

    def losses(self, batch: EpisodeBatch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """({loss, ce_loss, align_loss}, the student's context tokens per query)."""
        ffns = [s.ffn for s in self.sites]
        teacher_prompts = self.batch_prompts(batch, self.teacher_demo_mode)
        with torch.no_grad(), self.head_shift.suspended(), recorded_outputs(ffns) as teacher_states:
            teacher = self.backbone.assemble(teacher_prompts, padding_side="right")
            self.backbone(teacher)
        student_prompts = self.batch_prompts(batch, "none")
        with recorded_outputs(ffns) as student_states:
            student = self.backbone.assemble(student_prompts, padding_side="right")
            out = self.backbone(student, with_loss=True)
        align = alignment_loss(student_states, teacher_states, query_tails(student_prompts, student),
                               query_tails(teacher_prompts, teacher))
        loss = self.ce_loss_weight * out.loss + self.align_loss_weight * align
        return {"loss": loss, "ce_loss": out.loss.detach(), "align_loss": align.detach()}, \
            student.context_tokens.float()

    def training_step(self, batch: EpisodeBatch, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)  # the loss, context tokens and shots, as every method logs them
        bs = len(batch)
        self.log("train/ce_loss", self._parts["ce_loss"], batch_size=bs)
        self.log("train/align_loss", self._parts["align_loss"], batch_size=bs)
        return loss


def query_tails(prompts: list[Prompt], assembled) -> list[tuple[int, int]]:
    """Per prompt, the [start, end) positions of its query: from its last Image (the query's image) to its last real
    token (right padding). A student's and its teacher's tails hold the same tokens; the teacher's demos come before."""
    tails = []
    for b, prompt in enumerate(prompts):
        images = [i for i, seg in enumerate(prompt) if isinstance(seg, Image)]
        if not images:
            raise ValueError("MimIC aligns the query's positions from its image on; this episode's query has no image")
        tails.append((assembled.spans[b][images[-1]][0], int(assembled.attention_mask[b].sum())))
    return tails


def alignment_loss(student: list[torch.Tensor | None], teacher: list[torch.Tensor | None],
                   student_tails: list[tuple[int, int]], teacher_tails: list[tuple[int, int]]) -> torch.Tensor:
    """Mean over episodes of the MSE between the student's and the teacher's per-layer states at the query's positions
    (reference `calculate_layer_wise_loss`, `F.mse_loss(reduction="mean")` per sample, then the batch mean). Tails of
    unequal length (a tokenizer that merges across the demo boundary) are compared over their common end."""
    if any(s is None for s in student) or any(t is None for t in teacher):
        raise RuntimeError("a layer's feed-forward did not run: the recorded sites are not on this forward's path")
    per_episode = []
    for b, ((s0, s1), (t0, t1)) in enumerate(zip(student_tails, teacher_tails, strict=True)):
        n = min(s1 - s0, t1 - t0)
        s = torch.stack([h[b, s1 - n : s1] for h in student]).float()  # (layers, n, D)
        t = torch.stack([h[b, t1 - n : t1] for h in teacher]).float()
        per_episode.append(F.mse_loss(s, t))
    return torch.stack(per_episode).mean()


__all__ = ["MimICModule", "alignment_loss", "query_tails"]
