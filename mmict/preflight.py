"""Everything a run will need, checked before its first step: each problem with the command that fixes it.

`train` runs these checks before a run folder exists, so a refused start leaves nothing behind, and a run that
starts does not fail after hours of training for want of an evaluation split, NLTK data, CLIP weights, a
tokenizer or a GPU. `mmict doctor` prints the same checks as a verdict per item.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from data_modules.downstream import convert_command
from data_modules.streaming import find_shards


@dataclass
class Check:
    item: str  # what was checked, e.g. "eval shards: okvqa test split"
    ok: bool
    detail: str  # what was found
    fix: str = ""  # the command or setting that fixes it (empty when ok)

    def line(self) -> str:
        mark = "ok  " if self.ok else "FAIL"
        return f"[{mark}] {self.item}: {self.detail}" + ("" if self.ok or not self.fix else f"\n       fix: {self.fix}")


class PreflightError(RuntimeError):
    """A run cannot start: every failed check, each with its fix."""

    def __init__(self, failed: list[Check]) -> None:
        self.failed = failed
        super().__init__("the run cannot start:\n" + "\n".join(c.line() for c in failed))


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")


def eval_shards(cfg: DictConfig) -> list[Check]:
    """The evaluation's demo pool (train split) and queries (test split) of `eval.task`."""
    from mmict.eval.tasks import get_task

    task = get_task(cfg.eval.task, cfg.data.prompt_format)
    root = Path(cfg.data.root)
    checks = []
    for split, role in (("train", "demo pool"), ("test", "queries")):
        urls = find_shards(root, task.folder, split)
        if urls:
            checks.append(Check(f"eval shards: {task.name} {split} ({role})", True, f"{len(urls)} shard(s)"))
            continue
        others = sorted({Path(u).name.split("-")[0] for u in find_shards(root, task.folder, "*")} - {split})
        hint = (f" (found {', '.join(f'{o}-*.tar' for o in others)}: evaluation reads its {role} from "
                f"{split}-*.tar; convert the split you evaluate on, e.g. OK-VQA val, with --out "
                f"{root / task.folder}/{split}-%06d.tar)") if others else ""
        checks.append(Check(f"eval shards: {task.name} {split} ({role})", False,
                            f"no {root / task.folder}/{split}-*.tar{hint}",
                            convert_command(task.name, root / task.folder, split)))
    return checks


def nltk_data(cfg: DictConfig) -> list[Check]:
    """OK-VQA's answer stemming needs NLTK data, never downloaded at run time."""
    if cfg.eval.task != "okvqa" or (cfg.eval.postprocess and cfg.eval.postprocess != "okvqa"):
        return []
    from mmict.eval.metrics import MissingNLTKResourceError, check_nltk_data

    try:
        check_nltk_data()
    except MissingNLTKResourceError as err:
        return [Check("NLTK data (OK-VQA stemming)", False, f"missing {', '.join(err.missing)}",
                      f"python -m nltk.downloader -d {err.target_dir} {' '.join(err.missing)}; then "
                      f"export NLTK_DATA={err.target_dir}")]
    return [Check("NLTK data (OK-VQA stemming)", True, "punkt_tab, averaged_perceptron_tagger_eng, wordnet found")]


def rices_model(cfg: DictConfig) -> list[Check]:
    """RICES's CLIP weights: in the cache (or a local file / folder), or downloadable when online."""
    if cfg.eval.selection != "rices":
        return []
    from mmict.eval.protocol import PRESETS

    preset = PRESETS[cfg.eval.protocol]
    model = cfg.eval.rices.model or preset["rices_model"]
    pretrained = cfg.eval.rices.pretrained or preset["rices_pretrained"]
    item = f"RICES CLIP model {model} / {pretrained}"
    if model.startswith("local-dir:"):
        path = Path(model.split(":", 1)[1])
        return [Check(item, path.is_dir(), f"{path} {'found' if path.is_dir() else 'missing'}",
                      "" if path.is_dir() else "point eval.rices.model=local-dir:<folder> at an open_clip folder")]
    if pretrained and Path(pretrained).is_file():
        return [Check(item, True, f"weights file {pretrained}")]
    try:
        import open_clip
        from huggingface_hub import try_to_load_from_cache

        cfg_pretrained = open_clip.get_pretrained_cfg(model, pretrained) or {}
        repo = (cfg_pretrained.get("hf_hub") or "").strip("/")
        cached = any(isinstance(try_to_load_from_cache(repo, name), str)
                     for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")) if repo else False
    except Exception as err:  # noqa: BLE001 - an unknown model name or tag: open_clip's own message
        return [Check(item, False, f"{type(err).__name__}: {err}", "eval.rices.model / eval.rices.pretrained")]
    fetch = (f"python -c \"import open_clip; open_clip.create_model_and_transforms('{model}', "
             f"pretrained='{pretrained}')\"")
    if cached:
        return [Check(item, True, f"cached ({repo})")]
    if _offline():
        return [Check(item, False, "not in the Hugging Face cache and HF_HUB_OFFLINE is set", f"{fetch} (online)")]
    return [Check(item, True, f"not cached: downloaded from {repo or 'open_clip'} at evaluation")]


def hub_resource(name: str, item: str, kind: str) -> Check:
    """A hub id or local folder the run loads (a tokenizer or a model config): found, or the command that gets it."""
    if Path(name).exists():
        return Check(item, True, f"local folder {name}")
    from transformers import AutoConfig, AutoTokenizer

    loader = AutoTokenizer if kind == "tokenizer" else AutoConfig
    try:
        loader.from_pretrained(name, local_files_only=True)
        return Check(item, True, f"{name} (cached)")
    except Exception:  # noqa: BLE001 - not cached (OSError, ValueError by version): say how to get it
        pass
    if _offline():
        return Check(item, False, f"{name} is neither a local folder nor cached, and HF_HUB_OFFLINE is set",
                     f"huggingface-cli download {name} (online), or point the key at a local folder")
    return Check(item, True, f"{name}: not cached, downloaded at start")


def resources(cfg: DictConfig) -> list[Check]:
    """The backbone and, for MMICT, its M-Hub tokenizer (and BERT weights for the text branch)."""
    checks = []
    if cfg.backbone.toy is None:
        checks.append(hub_resource(cfg.backbone.name_or_path, f"backbone {cfg.backbone.name_or_path}", "config"))
    hub = cfg.method.mmict.hub_tokenizer if cfg.method.name == "mmict" else None
    if hub:
        checks.append(hub_resource(hub, f"M-Hub tokenizer {hub}", "tokenizer"))
    return checks


def accelerator(cfg: DictConfig) -> list[Check]:
    if cfg.trainer.accelerator not in ("gpu", "cuda"):
        return []
    import torch

    n = torch.cuda.device_count()
    want = cfg.trainer.devices if isinstance(cfg.trainer.devices, int) else 1
    if n == 0:
        return [Check("GPU", False, "trainer.accelerator=gpu but no CUDA device is visible",
                      "trainer.accelerator=cpu (or auto), or run on a GPU node")]
    if want > n:
        return [Check("GPU", False, f"trainer.devices={want} but {n} visible", f"trainer.devices={n}")]
    return [Check("GPU", True, f"{n} visible: {torch.cuda.get_device_name(0)}")]


def preflight(cfg: DictConfig, training_shards: Any = None) -> list[Check]:
    """Every check a run of `cfg` needs (training shards via `training_shards()`, a callable that raises
    FileNotFoundError with its fix, when given)."""
    checks: list[Check] = []
    if training_shards is not None:
        try:
            training_shards()
            checks.append(Check("training shards", True, "found"))
        except FileNotFoundError as err:
            lines = str(err).splitlines()
            checks.append(Check("training shards", False, lines[0], " ".join(lines[1:]).strip()))
    checks += accelerator(cfg) + resources(cfg)
    if cfg.eval.enabled:
        from mmict.config.extra_tasks import task_configs

        for task_cfg in [cfg, *task_configs(cfg)]:  # eval.task and each of eval.extra_tasks
            checks += [c for c in eval_shards(task_cfg) + nltk_data(task_cfg) + rices_model(task_cfg)
                       if c.item not in {d.item for d in checks}]
    return checks


def require(checks: list[Check]) -> None:
    failed = [c for c in checks if not c.ok]
    if failed:
        raise PreflightError(failed)
