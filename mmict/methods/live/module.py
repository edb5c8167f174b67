"""LIVE as a LightningModule: a frozen MLLM, and a vector per LM layer added to the query's hidden states.

Training, per episode of the task's train split (k demos + a query with its answer, `data.shots` = k, the teacher's
shots; the reference draws them at random from the train split per item, icv_src/icv_datasets/vqa_dataset.py lines
90-100, as task episodes do):

- teacher: the same frozen model on the vanilla ICL prompt (k demos as images + text, then the query and answer;
  the framework's "images" prompt), vectors off, under no_grad (icv_src/icv_module.py lines 103-105);
- student: the zero-shot prompt (query and answer), vectors on at every position (`mmict.backbones.steering`);
- loss = KL(teacher || student) on the answer's positions, at temperature T and times T^2, with `kl_eps` added to
  both distributions before the log (icv_module.py lines 121-134), + `gt_weight` x the student's ground-truth
  cross-entropy (lines 94-116).

Only the vectors and their scales train; the optimiser gives the scales their own learning rate (`alpha_lr`,
icv_module.py lines 171-192). Deliberate differences, documented in docs/methods.md#live: the KL compares the logits
that predict the answer's tokens (`kl_positions=reference`: the reference's mask, one position later); the
ground-truth loss is the framework's, over the answer's tokens (the reference's labels are the whole query prompt,
icv_module.py line 95).

Evaluation: LIVE shows no demos. Its row is the "none" demo mode with the vectors on, named so that the table says
"no demos at eval" and whose teacher it learnt from; its context tokens are zero-shot's, since its prompt is. Other
demo modes (vanilla ICL, text-only) run the frozen model with the vectors off: the baselines in the same table.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import DictConfig

from data_modules.shots import shots_label
from mmict.backbones import Backbone
from mmict.backbones.assembly import IGNORE_INDEX
from mmict.backbones.steering import SITES, ResidualSteering
from mmict.batch import EpisodeBatch
from mmict.methods.base import FrozenBackboneModule
from mmict.methods.live.vectors import LiveVectors
from mmict.optim import adamw_warmup_cosine
from mmict.segments import Prompt

log = logging.getLogger(__name__)

KL_POSITIONS: tuple[str, ...] = ("target", "reference")
TEACHER_MODE = "images"  # vanilla multimodal ICL: the teacher's prompt


def kl_divergence(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
                  eps: float = 1e-6) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) between softmaxes at `temperature`, times temperature^2;
    `eps` added to both probabilities before the log (LIVE's reference, icv_src/icv_module.py lines 121-134).
    `student`, `teacher`: (N, V) logits."""
    t = (teacher.float() / temperature).softmax(dim=-1)
    s = (student.float() / temperature).softmax(dim=-1)
    return (t * ((t + eps).log() - (s + eps).log())).sum(dim=-1).mean() * temperature**2


def answer_logit_mask(labels: torch.Tensor, positions: str, encoder_decoder: bool = False) -> torch.Tensor:
    """(B, L) bool: the logits the KL compares. `target`: those that predict an answer token (a causal LM's logits at
    t predict token t + 1; a seq2seq decoder's logits at t predict label t); `reference`: the logits at the answer
    tokens' own positions (the reference's `get_mask`, icv_module.py lines 136-148)."""
    is_target = labels != IGNORE_INDEX
    if positions == "reference" or encoder_decoder:
        return is_target
    mask = torch.zeros_like(is_target)
    mask[:, :-1] = is_target[:, 1:]
    return mask


class LIVEModule(FrozenBackboneModule):
    train_demo_mode = "none"  # the student's prompt; the teacher's is TEACHER_MODE
    # LIVE's own row (no demos, vectors on) beside vanilla ICL of the same frozen model (vectors off)
    default_eval_modes: tuple[str, ...] = ("none", "images")
    task_specific = True  # the vectors are learnt from one task's teacher: a companion is evaluated on that task alone

    def __init__(self, config: DictConfig | dict, backbone: Backbone | None = None) -> None:
        super().__init__(config, backbone)
        live = self.cfg.method.live
        if live.site not in SITES:
            raise ValueError(f"method.live.site={live.site!r}: use one of {SITES}")
        if live.kl_positions not in KL_POSITIONS:
            raise ValueError(f"method.live.kl_positions={live.kl_positions!r}: use one of {KL_POSITIONS}")
        if live.temperature <= 0:
            raise ValueError(f"method.live.temperature={live.temperature} must be > 0")
        self.steering = ResidualSteering(self.backbone, self._shifts, site=live.site,
                                         preserve_norm=live.preserve_norm)
        self.vectors = LiveVectors(self.steering.num_layers, self.backbone.hidden_size, alpha_init=live.alpha_init,
                                   alpha_sigmoid=live.alpha_sigmoid, alpha_learnable=live.alpha_learnable,
                                   init_std=live.vector_init_std)
        self._parts: dict[str, torch.Tensor] = {}

    def _shifts(self) -> torch.Tensor:
        return self.vectors()

    # ---- how evaluation names the rows --------------------------------------------------------------
    @property
    def mode_labels(self) -> dict[str, str]:  # type: ignore[override]
        return {"none": f"LIVE (no demos at eval, {shots_label(self.cfg.data)}-shot teacher)",
                "images": "vanilla ICL (images+text; LIVE's vectors off)",
                "text": "text-only demos (LIVE's vectors off)"}

    def fuse(self, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
        raise NotImplementedError("LIVE has no fused demonstrations: its evaluation modes are none (LIVE's "
                                  "vectors), images and text (the frozen model, vectors off)")

    def batch_prompts(self, batch: EpisodeBatch, demo_mode: str | None = None,
                      with_target: bool = True) -> list[Prompt]:
        """The prompts of `demo_mode`, and the vectors switched to match for the forwards that follow: on for the
        no-demo prompt (LIVE's), off when demos are shown (vanilla ICL of the frozen model). Evaluation runs each
        trial's forwards right after building its prompts (mmict/eval/loop.py), so no change there is needed."""
        mode = demo_mode or self.train_demo_mode
        self.steering.enabled = mode == "none"
        return super().batch_prompts(batch, mode, with_target)

    # ---- training -----------------------------------------------------------------------------------------------
    def loss(self, batch: EpisodeBatch, demo_mode: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(KL + gt_weight x ground truth, the student's context tokens per query); the parts in `self._parts`."""
        live = self.cfg.method.live
        enc_dec = self.backbone.is_encoder_decoder
        teacher_prompts = self.batch_prompts(batch, TEACHER_MODE)
        student_prompts = self.batch_prompts(batch, "none")
        with torch.no_grad(), self.steering.set(enabled=False):
            teacher_in = self.backbone.assemble(teacher_prompts, padding_side="right")
            teacher_logits = self.backbone(teacher_in).logits
        student_in = self.backbone.assemble(student_prompts, padding_side="right")
        with self.steering.set(enabled=True):
            out = self.backbone(student_in, with_loss=True)
        t_mask = answer_logit_mask(teacher_in.labels, live.kl_positions, enc_dec)
        s_mask = answer_logit_mask(student_in.labels, live.kl_positions, enc_dec)
        if not torch.equal(t_mask.sum(dim=1), s_mask.sum(dim=1)):
            raise RuntimeError(f"the teacher's and the student's answers have different token counts "
                               f"({t_mask.sum(dim=1).tolist()} vs {s_mask.sum(dim=1).tolist()}): the answer was "
                               f"tokenised differently after demos; report this prompt format")
        kl = kl_divergence(out.logits[s_mask], teacher_logits[t_mask], live.temperature, live.kl_eps)
        gt = out.loss
        self._parts = {"kl": kl.detach(), "gt": gt.detach(),
                       "teacher_context_tokens": teacher_in.context_tokens.float().mean()}
        return kl + live.gt_weight * gt, student_in.context_tokens.float()

    def training_step(self, batch: EpisodeBatch, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        bs = len(batch)
        self.log("train/kl_loss", self._parts["kl"], prog_bar=True, batch_size=bs)
        self.log("train/gt_loss", self._parts["gt"], batch_size=bs)
        self.log("train/teacher_context_tokens", self._parts["teacher_context_tokens"], batch_size=bs)
        scales = self.vectors.scales().detach()
        self.log("train/alpha_mean", scales.mean(), batch_size=bs)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW with the vectors at optim.lr and the scales at method.live.alpha_lr, weight decay on both (the
        reference's, icv_module.py lines 171-192), warm-up then cosine decay."""
        opt, live = self.cfg.optim, self.cfg.method.live
        groups = [{"params": [self.vectors.icv], "weight_decay": opt.weight_decay},
                  {"params": [p for p in [self.vectors.alpha] if p.requires_grad], "lr": live.alpha_lr,
                   "weight_decay": opt.weight_decay}]
        return adamw_warmup_cosine(groups, lr=opt.lr, warmup_steps=opt.warmup_steps,
                                   total_steps=self.cfg.trainer.max_steps, betas=tuple(opt.betas))
