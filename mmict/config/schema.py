"""The experiment config's schema: typed dataclasses (:class:`ExperimentConfig` and its sections), the tuples
of allowed values for string choices (``DTYPES``, ``DEMO_MODES``, ...; method names are the methods registry's)
and ``EXPERIMENTS_DIR``.

This is the foundation every other layer may import (models, callbacks, data modules), so it imports nothing from
``mmict``, ``data_modules`` or ``callbacks``: only the standard library.
"""

# The schema keeps ``Optional[...]`` instead of ``X | None`` because omegaconf 2.3 (allowed by
# pyproject.toml) cannot read PEP 604 unions in structured configs; 2.4 can, but we must not depend on it.
# ruff: noqa: UP007, UP045

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

# Found relative to this file (not the cwd) so `python -m mmict.train toy_aim` works from any directory;
# this file is mmict/config/schema.py, so the repo root is three levels up.
EXPERIMENTS_DIR: Path = Path(__file__).resolve().parent.parent.parent / "experiments"

# Methods the training entry point knows how to build. Extend this when a new LightningModule lands.
DEMO_DESIGNS: tuple[str, ...] = ("fused", "concat", "text", "none")  # MMICT's (mmict/methods/mmict/module.py)
PROJECTORS: tuple[str, ...] = ("linear", "mlp")
PROJECTOR_INITS: tuple[str, ...] = ("default", "identity")
AIM_READ_FORMATS: tuple[str, ...] = ("raw", "chat")  # how AIM reads a demo (mmict/methods/aim/reader.py)
AIM_READ_SPANS: tuple[str, ...] = ("text", "answer")  # whose positions AIM projects
# What a demo text's answer follows (the task table's "Short answer:", "Answer:", "Output:"): method.aim.answer_cues
AIM_ANSWER_CUES: tuple[str, ...] = ("Short answer:", "Answer:", "Output:")
# "auto": follows the effective precision (mmict/training/precision.py): bfloat16 under bf16-*, else float32.
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16", "auto")
STRATEGIES: tuple[str, ...] = ("auto", "ddp", "fsdp")
FSDP_SHARDING: tuple[str, ...] = ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD")  # mmict/training/fsdp.py
FSDP_STATE_DICT_TYPES: tuple[str, ...] = ("auto", "sharded", "full")
SHOTS_PER: tuple[str, ...] = ("episode", "step")
DEMO_MODES: tuple[str, ...] = ("fused", "images", "text", "none")  # how mmict/prompts.py shows demos
SELECTIONS: tuple[str, ...] = ("random", "rices")  # mmict.eval.selection.make_selector
BANK_STORES: tuple[str, ...] = ("hidden", "fused")  # what mmict/bank.py stores
# Lightning 2.x precision strings; checked here so a typo fails at load time, not after the model is built.
LIGHTNING_PRECISIONS: tuple[str, ...] = (
    "32-true",
    "32",
    "bf16-mixed",
    "bf16-true",
    "16-mixed",
    "16-true",
    "64-true",
    "auto",  # bf16-mixed where the GPU supports it, else 32-true (mmict/training/precision.py)
)


@dataclass
class ToyBackboneConfig:
    """Sizes of the tiny random-init toy backbone (LLaVA or BLIP-2) built when its folder does not exist yet."""

    image_size: int = 32
    patch_size: int = 8
    vision_hidden_size: int = 64
    vision_layers: int = 2
    text_hidden_size: int = 96
    text_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 256
    max_position_embeddings: int = 1024
    seed: int = 0
    # Pretraining from scratch on generated documents (captions, binding episodes over the pretrain
    # word pool, word lists; see mmict/toy/pretrain_data.py), run once and cached, so the frozen model
    # AIM sits on reads images and does in-context binding; 0 keeps it random.
    pretrain_steps: int = 0  # all steps, the word-list warm-up included
    pretrain_text_steps: int = 0  # warm-up on word lists only (where copying, an induction head, is learnt)
    pretrain_vision_steps: int = 0  # the vision tower's own stage first (reads colour, shape, position)
    # Stage 2's grounding loss: the LM's hidden states (at `pretrain_grounding_layer`) at the text
    # after an image predict that image's attributes, as labelled by the vision stage's heads. 0 = off.
    pretrain_grounding_weight: float = 0.0
    pretrain_grounding_layer: int = 2
    pretrain_batch_size: int = 16
    pretrain_lr: float = 1e-3
    # Document kinds of the language stage and their weights (mmict/toy/pretrain_data.py MIX: captions, binding,
    # word_lists, recall, concept); null: MIX.
    pretrain_mix: Optional[dict[str, float]] = None
    # llava (a tiny LLaVA) | blip2 (a tiny BLIP-2 with an OPT LM: vision tower, Q-Former, OPT; mmict/toy/blip2.py)
    family: str = "llava"
    qformer_hidden_size: int = 64  # blip2: the Q-Former's width, depth and query count
    qformer_layers: int = 2
    num_query_tokens: int = 8
    pretrain_qformer_steps: int = 0  # blip2: BLIP-2's stage 1 (Q-Former + text branch: ITC, ITM, ITG); 0 = skip


@dataclass
class LoraSettings:
    """peft LoRA on the language model (the fine-tuning baseline); r=0 leaves the backbone fully frozen."""

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Optional[list[str]] = None  # null: the family's attention projections


@dataclass
class BackboneConfig:
    family: str = "llava"  # adapter family: llava, llava_next, qwen2_vl, qwen2_5_vl, idefics2, idefics3, blip2
    name_or_path: str = "data/toy/backbone"  # hub id or local folder
    # float32 | bfloat16 | float16 | auto (follows trainer.precision); what the hardware cannot run falls back
    # to float32 with a warning (mmict/training/precision.py)
    dtype: str = "float32"
    chat_template: bool = True  # wrap the query in the model's chat template when it has one
    lora: LoraSettings = field(default_factory=LoraSettings)
    # When set and name_or_path does not exist, a tiny random-init model is built there.
    toy: Optional[ToyBackboneConfig] = field(default_factory=ToyBackboneConfig)
    # The backbone the method's paper used where this one stands in for it (e.g. "Qwen-VL" for AIM's Qwen2-VL
    # runs): every table and results.json then say the rows are from a substitute, not the paper's model.
    substitute_for: Optional[str] = None


@dataclass
class AIMConfig:
    layer: int = -1  # which hidden-state layer to read at demo text positions (-1 = final)
    final_norm: bool = True  # apply the LM's final norm to a non-final layer's states
    projector: str = "linear"  # linear | mlp
    mlp_hidden: Optional[int] = None  # hidden width of the mlp projector (default: d)
    # default: PyTorch's Linear init; identity (linear only): fused tokens start as the hidden states
    # themselves, a fit start when `layer` is an early one whose states still look like input embeddings.
    projector_init: str = "default"
    # How the frozen MLLM reads a demo: raw ([BOS][image][text]) or chat (one user turn, image + instruction, then
    # the assistant's answer, through the backbone's chat template); the positions read: docs/methods.md#aim.
    read_format: str = "raw"
    # Whose hidden states become fused tokens: the demo's whole text (instruction and answer), or its answer only.
    read_span: str = "text"
    # A demo text's answer follows the last of these it holds ("Question:{q} Short answer:{a}"); a text with none
    # (a web document's) is all answer. Read only by read_format=chat or read_span=answer.
    answer_cues: list[str] = field(default_factory=lambda: list(AIM_ANSWER_CUES))
    # Text placed after each demo's fused tokens in the query prompt (training and evaluation); null: none.
    fused_separator: Optional[str] = None


@dataclass
class HubSizes:
    """A fresh M-Hub's Q-Former sizes (ignored when it starts from a BLIP-2 checkpoint, which has its own)."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    cross_attention_frequency: int = 2  # a cross-attention block every N layers (BLIP-2: 2)
    num_query_tokens: int = 32
    max_text_tokens: int = 64  # M-Hub text positions (longer demo/prompt texts are truncated)


@dataclass
class MMICTConfig:
    hub: HubSizes = field(default_factory=HubSizes)
    init_from_backbone: bool = True  # BLIP-2 backbones: start from the checkpoint's Q-Former, queries, projection
    hub_tokenizer: Optional[str] = None  # the M-Hub's text tokenizer (e.g. bert-base-uncased); null: the LLM's
    # Where the M-Hub's text branch (word/position embeddings, text feed-forward: BLIP-2 has none) starts: bert
    # (from hub_tokenizer's BERT checkpoint, as LAVIS) | query_branch (feed-forward copied from the query one,
    # embeddings random); null: bert when hub_tokenizer is set, else query_branch (mmict/methods/mmict/text_init.py)
    text_init: Optional[str] = None
    # The query's M-Hub features read its prompt (text-conditioned) or not (text-free), at training and evaluation;
    # null: per design (fused, text: on; concat, none: off, as the reference's vanilla ICT)
    query_text: Optional[bool] = None
    eoc_trainable: bool = False  # the <eoc> separator's embedding trains (a saved copy) or stays the frozen row
    temporal_embedding: bool = False  # video: a learned per-frame embedding on the frames' vision tokens
    max_frames: int = 32  # frames the temporal embedding covers


@dataclass
class LiveConfig:
    """LIVE (Peng et al. NeurIPS'24, ForJadeForest/LIVE-Learnable-In-Context-Vector): a learnt vector per LM layer
    added to the query's hidden states; the teacher's shots are `data.shots` (docs/methods.md#live)."""

    site: str = "layer"  # what is shifted: layer (a decoder layer's output) | mlp (its MLP's; the reference, Idefics2)
    preserve_norm: bool = True  # rescale each shifted state to its old norm (the reference's)
    alpha_init: float = 0.1  # per-layer scale's start (the README's recipe; its config default is 0.0)
    alpha_sigmoid: bool = False  # scale = sigmoid(alpha) (the README's recipe: off)
    alpha_learnable: bool = True
    alpha_lr: float = 1.0e-2  # the scales' learning rate; the vectors' is optim.lr
    vector_init_std: float = 0.01  # vectors start ~ N(0, std^2)
    gt_weight: float = 0.5  # ground-truth cross-entropy weight beside the KL (the reference's hard_loss_weight)
    temperature: float = 1.0  # KL temperature (the reference's init_temperature, not decayed in its recipe)
    kl_eps: float = 1.0e-6  # added to both distributions before the log (the reference's kl_eps)
    # Where the KL compares teacher and student: target (the logits that predict the answer's tokens) or reference
    # (the logits at the answer's own positions, as the reference's mask does: one position later).
    kl_positions: str = "target"


@dataclass
class MimICConfig:
    """MimIC (Kamichanw/MimIC): learnt per-head, query-dependent shifts before each attention output projection;
    the teacher's shots are the training episodes' demos, `data.shots` (docs/methods.md#mimic)."""

    ce_loss_weight: float = 0.5  # the reference's src/config/peft/mimic.yaml
    align_loss_weight: float = 1.0  # on the layer-wise MSE of the feed-forward outputs at the query's positions
    teacher_demo_mode: str = "images"  # how the teacher sees the demos: images (vanilla ICL) | text
    # The gate's normaliser over the query's own keys: false = every key of the sequence (the reference's), true =
    # keys up to the query's position (what its attention sees).
    causal_normaliser: bool = False


@dataclass
class MethodConfig:
    name: str = "aim"  # aim | finetune | mmict | live | mimic
    # How demonstrations enter the prompt (MMICT): fused (M-Hub text features), concat (vanilla ICT: visual
    # features + demo text), text (demo text only), none (vanilla fine-tune). AIM's own is fused.
    demo_design: str = "fused"
    aim: AIMConfig = field(default_factory=AIMConfig)
    mmict: MMICTConfig = field(default_factory=MMICTConfig)
    live: LiveConfig = field(default_factory=LiveConfig)
    mimic: MimICConfig = field(default_factory=MimICConfig)


@dataclass
class ToyWorldConfig:
    """Size of the self-made toy world (interleaved docs, a VQA task, the binding and concept tasks) under
    data.root."""

    num_docs: int = 3000
    val_docs: int = 200
    vqa_train: int = 500
    vqa_test: int = 300
    binding_fraction: float = 0.5  # of the web documents that are binding episodes (tuning word pool)
    binding_episodes: int = 100  # downstream binding episodes (eval word pool)
    binding_pool_per_class: int = 8  # demo pool images per class and episode
    binding_queries_per_episode: int = 3
    n_way: int = 2  # classes per binding episode
    concept_fraction: float = 0.25  # of the web documents that are concept episodes (tuning rules)
    concept_episodes: int = 100  # downstream concept episodes (eval rules)
    concept_pool_per_class: int = 8  # demo pool images per label (yes / no) and episode
    concept_queries_per_episode: int = 3  # their labels uniformly random
    concept_tuning_episodes: int = 600  # concept_tuning train split: episodes over the tuning rules
    concept_tuning_val_episodes: int = 50  # concept_tuning val split
    concept_tuning_per_class: int = 5  # images per label and concept_tuning episode
    image_size: int = 32
    seed: int = 0


@dataclass
class DataConfig:
    root: str = "data/toy"
    # When set, the toy world is written to root (once).
    toy: Optional[ToyWorldConfig] = field(default_factory=ToyWorldConfig)
    # Demos per training episode (the DemoSampler callback, data_modules/shots.py): `shots` fixes k; else
    # `shot_schedule` [[from_step, min, max], ...]; else k ~ uniform[min_shots, max_shots]. Validation: max.
    min_shots: int = 1
    max_shots: int = 4
    shots: Optional[int] = None
    shot_schedule: Optional[list[list[int]]] = None
    shots_per: str = "episode"  # episode: each episode draws its k | step: all episodes of a batch share it
    batch_size: int = 8
    num_workers: int = 1
    epoch_size: int = 2000
    shuffle_buffer: int = 500
    val_episodes: int = 64
    # Training episodes: null = cut from the interleaved web corpus (AIM); a downstream task name (e.g. vqav2)
    # = query and demos drawn from that task's train split (MMICT), validated on `val_split`.
    task: Optional[str] = None
    val_split: str = "val"
    # The tasks' prompt formats, the same in training and evaluation (mmict/eval/tasks.py PROMPT_FORMATS):
    # openflamingo (OpenFlamingo's few-shot prompts) or mmict_reference (MMICT's reference: caption instructions,
    # bare cleaned captions as demo texts, "Question: {}Short answer:").
    prompt_format: str = "openflamingo"
    # Training image augmentation: none, or mmict_reference (LAVIS's blip2_image_train: RandomResizedCrop to the
    # backbone's size, scale 0.5-1, bicubic, then a random horizontal flip), on task episodes only.
    augment: str = "none"
    corpus: str = "web"  # the web corpus's folder under root (`mmict data convert mmc4 --out <root>/<corpus>/...`)
    # Web documents: drop images whose MMC4 image-text similarity is below this (OpenFlamingo: 0.24), and
    # images whose shorter side is below min_image_size pixels; both counted in the skip report.
    min_similarity: Optional[float] = None
    min_image_size: int = 0
    # Web texts (demo and query texts of the corpus's episodes) longer than this many tokens of the backbone's
    # tokenizer are cut to it, and counted in the skip report ("text cut to N tokens"), so one huge document cannot
    # stall a step. Each is first cut to 8 characters per token, so no tokenizer ever sees a huge text whole.
    max_text_tokens: int = 512


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class FSDPSettings:
    """`trainer.strategy: fsdp` (mmict/training/fsdp.py): units per transformer block, trainable weights in units
    of their own."""

    sharding_strategy: str = "FULL_SHARD"  # FULL_SHARD | SHARD_GRAD_OP | HYBRID_SHARD | NO_SHARD
    activation_checkpointing: bool = True  # on the LM's decoder layers
    # Checkpoints hold the trainable weights + optimizer + loop state only. sharded: one shard per rank, no
    # gather (consolidate: python -m lightning.pytorch.utilities.consolidate_checkpoint CKPT_DIR); full: one
    # file on rank 0; auto: sharded when the model has >= sharded_above_params parameters.
    state_dict_type: str = "auto"
    sharded_above_params: int = 1_000_000_000
    cpu_offload: bool = False


@dataclass
class DivergenceGuardSettings:
    """`trainer.divergence_guard` (callbacks/divergence_guard.py): stop a run that diverges without a NaN."""

    factor: float = 4.0  # the loss counts as far above its start at factor x the mean of the first `warmup` losses
    patience: int = 20  # ... for this many steps in a row
    warmup: int = 10  # steps whose mean loss is the starting value
    # The trained weights' norm above this x its value when training began (an absurd learning rate, whose loss
    # can stay finite and merely mediocre) stops the run at once; null: not checked.
    weight_factor: Optional[float] = 100.0


@dataclass
class TrainerConfig:
    max_steps: int = 300
    precision: str = "32-true"  # a Lightning precision, or auto (bf16-mixed where the GPU has bf16, else 32-true)
    accelerator: str = "auto"
    devices: int = 1
    val_check_interval: int = 100
    limit_val_batches: int = 8
    log_every_n_steps: int = 10
    gradient_clip_val: Optional[float] = 1.0
    checkpoint_every_n_steps: int = 100
    progress_bar: bool = True
    strategy: str = "auto"  # auto (one device; ddp on several) | ddp | fsdp (see trainer.fsdp)
    num_nodes: int = 1  # SLURM: `mmict sweep` sets it from slurm.nodes
    fsdp: FSDPSettings = field(default_factory=FSDPSettings)
    # Beside the NaN guard: stop when the loss stays far above its start or the weights blow up; null: off.
    divergence_guard: Optional[DivergenceGuardSettings] = field(default_factory=DivergenceGuardSettings)


@dataclass
class LoggerConfig:
    wandb: bool = True
    offline: bool = True
    project: str = "mmict"
    entity: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    group: Optional[str] = None  # W&B group; `mmict sweep` sets it to the sweep id


@dataclass
class RicesConfig:
    """CLIP image features for RICES demo selection (open_clip), cached on disk per model and pool."""

    # open_clip name, hf-hub:org/repo, or local-dir:/path; null: the protocol's (openflamingo: ViT-L-14 / openai,
    # OpenFlamingo's --rices_vision_encoder_path default; mmict: ViT-B-32 / openai)
    model: Optional[str] = None
    pretrained: Optional[str] = None  # tag or checkpoint file (ignored with hf-hub:/local-dir:); null: the protocol's
    precision: str = "fp32"
    batch_size: int = 64
    device: Optional[str] = None  # null: cuda if available
    download_dir: Optional[str] = None  # open_clip's weights cache (null: the Hugging Face cache)
    cache_dir: Optional[str] = "data/rices_cache"  # pool features, shared across runs; null: no cache


@dataclass
class BankConfig:
    """The demonstration bank (mmict/bank.py): each pool demo read by the frozen model once, kept on disk."""

    enabled: bool = True  # AIM's fused demos come from the bank (computed once per backbone, layer, demo)
    dir: Optional[str] = None  # null: <data.root>/bank
    store: str = "hidden"  # hidden (reader output: shared by every projector) | fused (keyed by the projector)
    batch_size: int = 16  # demos read per backbone call while building


@dataclass
class VisionCacheConfig:
    """Evaluation's cache of each image's frozen vision-path output (mmict/backbones/vision_cache.py): an image shown
    again (a demo in another trial, seed or shot count, a query in another demo mode) is not encoded again."""

    enabled: bool = True
    max_mb: float = 1024.0  # features held in memory, on the model's device (least recently used dropped first)
    dir: Optional[str] = None  # also kept on disk here, across runs (one folder per backbone key); null: memory only


@dataclass
class EvalConfig:
    enabled: bool = True
    # The named preset that pins every setting that moves a number (mmict/eval/protocol.py, docs/evaluation.md):
    # openflamingo (OpenFlamingo's harness, point by point), mmict_reference (MMICT's reference code) or mmict
    # (this framework's earlier protocol). Settings
    # below left null take the protocol's value; one set otherwise is applied and named in every table.
    protocol: str = "mmict"
    shots: list[int] = field(default_factory=lambda: [0, 2, 4])
    # Queries per trial (null: the whole test split): openflamingo draws a seeded random subset per seed (its
    # --num_samples), mmict takes the first N in file order.
    num_queries: Optional[int] = 200
    seeds: list[int] = field(default_factory=lambda: [0])
    batch_size: int = 32
    max_new_tokens: Optional[int] = None  # null: the protocol's (openflamingo: VQA 5, TextVQA 10, captions 20)
    num_beams: Optional[int] = None  # null: the protocol's (openflamingo: 3; mmict: greedy VQA, 3 for captions)
    length_penalty: Optional[float] = None  # null: the protocol's (openflamingo: 0.0; mmict: the model's default)
    min_new_tokens: Optional[int] = None  # null: the protocol's (mmict_reference: captions 8, VQA 1; others: 0)
    # What 0 shots shows: text_demos (OpenFlamingo's: 2 text-only demos), none (no demos), both; null: the protocol's
    zero_shot: Optional[str] = None
    # Random demos come from a fixed random subset of this many train examples per seed; null: the protocol's
    # (openflamingo: 2048, its --query_set_size; mmict: the whole train split)
    demo_pool_size: Optional[int] = None
    # Demo images at the model's full view, or at its base view (no AnyRes tiles / Idefics splitting; the query
    # keeps its full view) so more shots fit the context window.
    demo_image_view: str = "full"
    # A trial whose longest prompt (plus the answer) exceeds the LM's positions: skip (not run, reported as "over
    # context") or run (scored, flagged, and still left out of AIM-vs-ICL ratios).
    over_context: str = "skip"
    # VQA accuracy's leave-one-out: official (one answer left out by position) or openflamingo (VizWiz and TextVQA:
    # equal answers left out together, as OpenFlamingo's id-less answer files make it); null: the protocol's.
    vqa_scoring: Optional[str] = None
    postprocess: Optional[str] = None  # null: the task's own; or vqa | caption | first_word | none
    # Demo selection: random (seeded, OpenFlamingo's protocol; in-episode for binding tasks) or rices
    # (most CLIP-similar pool images, most similar last; the same demos for every seed).
    selection: str = "random"
    rices: RicesConfig = field(default_factory=RicesConfig)
    task: str = "toy_vqa"
    # how demos are shown at evaluation: fused (the method's own), images (vanilla ICL), text, concat (MMICT's
    # vanilla ICT), none; null: the method's own (AIM: fused, images, text; MMICT: its demo_design).
    demo_modes: Optional[list[str]] = None
    bank: BankConfig = field(default_factory=BankConfig)
    vision_cache: VisionCacheConfig = field(default_factory=VisionCacheConfig)
    # Experiments trained and evaluated after this run, on its backbone, data root and evaluation settings;
    # their rows join this run's table (mmict/companions.py). toy_aim adds MMICT this way.
    companions: list[str] = field(default_factory=list)
    # Further tasks the trained weights are evaluated on after eval.task, each "<task> [eval.key=value ...]" (its own
    # evaluation overrides; the rest is this run's), reported under eval/<task>/ (mmict/config/extra_tasks.py).
    extra_tasks: list[str] = field(default_factory=list)


@dataclass
class SlurmConfig:
    """Resources of the job arrays `mmict sweep` writes (mmict/slurm.py); one array task per grid point."""

    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    nodes: int = 1
    gpus_per_node: int = 1  # = tasks per node (one process per GPU) = trainer.devices
    cpus_per_task: int = 8
    mem: Optional[str] = None  # e.g. 64G; null: the partition's default
    time: str = "24:00:00"
    constraint: Optional[str] = None  # e.g. a100|h100
    max_concurrent: Optional[int] = None  # at most this many array tasks at once (--array=0-N%max)
    signal_seconds: int = 90  # SIGUSR1 this long before the time limit: Lightning checkpoints and requeues
    python: str = ".venv/bin/python"  # the interpreter srun starts (after `setup`)
    setup: list[str] = field(default_factory=list)  # shell lines before srun: module load ..., conda activate ...
    extra_sbatch: list[str] = field(default_factory=list)  # more options, e.g. ["--exclusive", "--mail-type=FAIL"]
    log_dir: Optional[str] = None  # null: <sweep folder>/logs


@dataclass
class ExperimentConfig:
    name: str = ""  # run name; defaults to the experiment file stem
    seed: int = 0
    run_root: str = "runs"  # runs go to <run_root>/<name>/<timestamp>/
    # A fixed run folder (reused, e.g. by a requeued SLURM task to find its checkpoint); null: a new
    # timestamped one (under SLURM: <run_root>/<name>/slurm-<job id>, the same on every rank).
    run_dir: Optional[str] = None
    # auto: an interrupted run of this same config (unfinished, with a checkpoint) is continued where its last
    # checkpoint left it, data stream and RNGs included; never: always a new run; or a checkpoint / run folder.
    resume: str = "auto"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
