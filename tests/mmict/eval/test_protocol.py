"""Evaluation protocols against the reference harness's behaviour (OpenFlamingo, open_flamingo/eval/ at 655f693):
each `openflamingo` setting reaches the place it acts (prompts, generate, the subsets, the averaging), the `mmict`
preset keeps the earlier behaviour, and a trial past the LM's positions is marked, not scored, and kept out of
AIM-vs-ICL ratios."""

from __future__ import annotations

import io
import json
import math
import random

import numpy as np
import pytest
import torch
import webdataset as wds
from helpers import eval_section as eval_cfg
from PIL import Image as PILImage

from data_modules.downstream import Example
from mmict.config import load_config
from mmict.eval import loop as eval_loop
from mmict.eval.protocol import PRESETS, mmict_protocol, resolve
from mmict.eval.runner import caption_pool, run_eval
from mmict.eval.tasks import get_task
from mmict.methods.aim.report import aim_vs_icl
from mmict.methods.base import FrozenBackboneModule
from mmict.segments import Image, Text

WORDS = ["red", "blue", "green", "circle", "square", "left", "right"]


# ------------------------------------------------------------------------------------------------ presets


@pytest.mark.parametrize(("task", "beams", "max_new", "lp"), [
    ("okvqa", 3, 5, 0.0), ("vizwiz", 3, 5, 0.0), ("vqav2", 3, 5, 0.0), ("textvqa", 3, 10, 0.0),
    ("flickr30k", 3, 20, 0.0), ("coco_caption", 3, 20, 0.0),
])
def test_openflamingo_decoding_is_the_harness_defaults(task, beams, max_new, lp):
    """evaluate_vqa(num_beams=3, length_penalty=0.0, max_generation_length=5), TextVQA 10, evaluate_captioning(3, 0.0,
    20): evaluate.py lines 903-907, 621, 731-735."""
    p = resolve(eval_cfg(), get_task(task), selection="random")
    assert (p.decoding.num_beams, p.decoding.max_new_tokens, p.decoding.length_penalty) == (beams, max_new, lp)
    assert p.decoding.generate_kwargs() == {"num_beams": beams, "max_new_tokens": max_new, "length_penalty": lp}
    assert p.zero_shot == "text_demos" and p.zero_shot_text_demos == 2 and p.demo_pool_size == 2048
    assert p.spread == "population" and p.query_subset == "seeded" and p.overrides == {}
    assert p.label == "openflamingo"


def test_mmict_preset_keeps_the_earlier_behaviour_and_overrides_are_named():
    p = resolve(eval_cfg(protocol="mmict"), get_task("okvqa"), selection="random")
    assert (p.decoding.num_beams, p.decoding.max_new_tokens, p.decoding.length_penalty) == (1, 5, None)
    assert "length_penalty" not in p.decoding.generate_kwargs()  # the model's own default applies
    assert (p.zero_shot, p.demo_pool_size, p.query_subset, p.spread) == ("none", None, "first", "sample")
    assert p.demo_separator == " "
    changed = resolve(eval_cfg(num_beams=1, zero_shot="none"), get_task("okvqa"), selection="random")
    assert changed.decoding.num_beams == 1 and changed.zero_shot == "none"
    assert changed.label == "openflamingo (modified: num_beams=1, zero_shot=none)"
    assert changed.as_dict()["overrides"] == {"num_beams": 1, "zero_shot": "none"}
    # a value equal to the preset's is not a departure
    assert resolve(eval_cfg(num_beams=3), get_task("okvqa"), selection="random").label == "openflamingo"


def test_rices_uses_vit_l_14_openai_as_openflamingo():
    """--rices_vision_encoder_path ViT-L-14, --rices_vision_encoder_pretrained openai (evaluate.py lines 93-103)."""
    p = resolve(eval_cfg(), get_task("okvqa"), selection="rices")
    assert (p.rices_model, p.rices_pretrained) == ("ViT-L-14", "openai")
    assert p.demo_pool_size is None  # RICES searches the whole train split (no 2048 query set)
    assert PRESETS["mmict"]["rices_model"] == "ViT-B-32"


def test_demo_separator_follows_the_harness_per_task_style():
    """<|endofchunk|> + "\\n" after VQA / caption demos (evaluate.py 1018-1024, 830-834), <|endofchunk|> alone
    between classification demos (line 1225); no <|endofchunk|> for a tokenizer without it."""
    assert resolve(eval_cfg(), get_task("okvqa"), selection="random", eoc="<|endofchunk|>").demo_separator == (
        "<|endofchunk|>\n")
    assert resolve(eval_cfg(), get_task("hateful_memes"), selection="random",
                   eoc="<|endofchunk|>").demo_separator == "<|endofchunk|>"
    assert resolve(eval_cfg(), get_task("flickr30k"), selection="random").demo_separator == "\n"


def _reference_openflamingo_draws(seed: int, n_test: int, num_samples: int, n_train: int, query_set_size: int,
                                  k: int) -> tuple[list[int], list[list[int]]]:
    """What OpenFlamingo's harness does on one process (rank 0, world size 1), written from its code:
    np.random.seed(seed) (evaluate.py 977), prepare_eval_samples: np.random.choice + Subset + DistributedSampler
    (utils.py 49-62), get_query_set: np.random.choice (utils.py 41-46), random_seed(seed, 0) (utils.py 8-11), then per
    batch sample_batch_demos_from_query_set: random.sample(query_set, k) per query (utils.py 34-38)."""
    np.random.seed(seed)
    indices = np.random.choice(n_test, num_samples, replace=False)
    dataset = torch.utils.data.Subset(list(range(n_test)), indices)
    sampler = torch.utils.data.distributed.DistributedSampler(dataset, num_replicas=1, rank=0)
    query_set = list(np.random.choice(n_train, query_set_size, replace=False))
    order = [dataset[i] for i in sampler]
    random.seed(seed)
    demos = [random.sample(query_set, k) for _ in order]
    return [int(i) for i in order], [[int(d) for d in ds] for ds in demos]


@pytest.mark.parametrize("seed", [42, 0, 7])
def test_seeded_subsets_and_demo_draws_are_openflamingos(seed):
    p = resolve(eval_cfg(num_queries=13), get_task("okvqa"), selection="random")
    queries, pool = p.subsets(seed, num_test=50, num_pool=3000, random_demos=True)
    rng = p.trial_rng(seed, 4)
    drawn = [rng.sample(pool, 4) for _ in queries]
    ref_queries, ref_demos = _reference_openflamingo_draws(seed, 50, 13, 3000, 2048, 4)
    assert queries == ref_queries and drawn == ref_demos
    other, _ = p.subsets(seed + 1, num_test=50, num_pool=3000, random_demos=True)
    assert set(other) != set(queries)  # a subset per trial seed


def test_mmict_subsets_are_the_first_n_and_the_whole_pool():
    p = mmict_protocol(num_queries=5)
    assert p.subsets(3, n_test := 20, 30, True) == (list(range(5)), list(range(30)))
    assert n_test == 20


def test_spread_population_with_nan_skipped_or_sample():
    """np.nanmean / np.nanstd over trials (evaluate.py 444-450) vs statistics.stdev."""
    of = resolve(eval_cfg(), get_task("okvqa"), selection="random")
    mean, std = of.mean_and_spread([0.5, 0.7, math.nan])
    assert mean == pytest.approx(np.nanmean([0.5, 0.7, np.nan])) and std == pytest.approx(np.nanstd([0.5, 0.7]))
    assert std == pytest.approx(0.1)
    assert mmict_protocol().mean_and_spread([0.5, 0.7])[1] == pytest.approx(0.1414213, rel=1e-5)


def test_caption_pool_is_karpathy_train_only_under_openflamingo():
    def ex(i, split):
        return Example(id=str(i), image=torch.zeros(1), question="", answers=["a cap"], task="coco_caption",
                       source_split=split)

    pool = [ex(0, "train"), ex(1, "restval"), ex(2, "train")]
    of = resolve(eval_cfg(), get_task("coco_caption"), selection="random")
    assert [e.id for e in caption_pool(pool, of, get_task("coco_caption"))] == ["0", "2"]
    mm = resolve(eval_cfg(protocol="mmict"), get_task("coco_caption"), selection="random")
    assert len(caption_pool(pool, mm, get_task("coco_caption"))) == 3
    with pytest.raises(ValueError, match="convert the train split again"):
        caption_pool([ex(0, None)], of, get_task("coco_caption"))


# ------------------------------------------------------------------------------------------------ end to end


def _png(rng: random.Random, size: int = 16) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3))).save(buf, format="PNG")
    return buf.getvalue()


def write_vqa(root, split: str, n: int, seed: int, size: int = 16) -> None:
    rng = random.Random(seed)
    folder = root / "okvqa"
    folder.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(folder / f"{split}-000000.tar")) as sink:
        for i in range(n):
            meta = {"id": f"{split}{i}", "question": f"what is {rng.choice(WORDS)} ?", "answers": [rng.choice(WORDS)]}
            sink.write({"__key__": f"{split}{i:04d}", "png": _png(rng, size), "json": json.dumps(meta).encode()})


@pytest.fixture()
def vqa_root(tmp_path):
    write_vqa(tmp_path / "data", "train", 12, seed=0)
    write_vqa(tmp_path / "data", "test", 10, seed=1, size=24)  # queries 24 px, demos 16 px: told apart below
    return tmp_path


def okvqa_cfg(tmp_path, backbone_dir, *overrides):
    return load_config("toy_aim", [
        f"run_root={tmp_path / 'runs'}", f"data.root={tmp_path / 'data'}", f"backbone.name_or_path={backbone_dir}",
        "backbone.toy=null", "eval.task=okvqa", "eval.postprocess=vqa", "eval.batch_size=4",
        "eval.demo_modes=[images,text]", "eval.max_new_tokens=null", "logger.wandb=false", *overrides])


class Recorder:
    """What reaches the model: every prompt by demo mode, and generate's keyword arguments."""

    def __init__(self, module, monkeypatch):
        self.prompts: list[tuple[str, list]] = []
        self.generate: list[dict] = []
        build, generate = module.batch_prompts, module.backbone.generate_from

        def batch_prompts(batch, demo_mode=None, with_target=True):
            prompts = build(batch, demo_mode=demo_mode, with_target=with_target)
            if not any(isinstance(s.pixels, eval_loop._ImageStandIn) for p in prompts for s in p
                       if isinstance(s, Image)):  # the dry-run count builds them too
                self.prompts += [(demo_mode, p) for p in prompts]
            return prompts

        def generate_from(assembled, **kwargs):
            self.generate.append(kwargs)
            return generate(assembled, **kwargs)

        monkeypatch.setattr(module, "batch_prompts", batch_prompts)
        monkeypatch.setattr(module.backbone, "generate_from", generate_from)


def test_openflamingo_eval_end_to_end(vqa_root, tiny_backbone, tiny_backbone_dir, monkeypatch):
    tmp_path = vqa_root
    cfg = okvqa_cfg(tmp_path, tiny_backbone_dir, "eval.protocol=openflamingo", "eval.shots=[0,2]",
                    "eval.seeds=[0,1]", "eval.num_queries=6", "eval.demo_pool_size=8",
                    "backbone.substitute_for=Qwen-VL")
    module = FrozenBackboneModule(cfg, backbone=tiny_backbone)
    rec = Recorder(module, monkeypatch)
    outcome = run_eval(module, cfg, tmp_path / "eval")
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    settings = results["protocol_settings"]
    assert results["protocol"] == "openflamingo"
    assert results["protocol_label"] == "openflamingo (modified: demo_pool_size=8)"
    assert settings["decoding"] == {"num_beams": 3, "max_new_tokens": 5, "length_penalty": 0.0, "min_new_tokens": 0}
    assert settings["spread"] == "population" and settings["zero_shot"] == "text_demos"
    # beams and length penalty reach generate, in every trial
    assert rec.generate and all(kw == {"num_beams": 3, "max_new_tokens": 5, "length_penalty": 0.0}
                                for kw in rec.generate)
    # 0-shot: OpenFlamingo's 2 text-only demos, each ended by "\n" (the tiny tokenizer has no <|endofchunk|>)
    zero = [p for mode, p in rec.prompts if mode == "text" and sum(isinstance(s, Image) for s in p) == 1]
    assert zero and all(len(p) == 4 and isinstance(p[0], Text) and p[0].text.endswith("\n") and
                        p[0].text.startswith("Question:") and isinstance(p[2], Image) for p in zero)
    trials = results["trials"]
    zero_trials = [t for t in trials if t["shots"] == 0]
    assert {t["method"] for t in zero_trials} == {"zero_shot_text"} and all(t["demos_shown"] == 2 for t in zero_trials)
    assert ("0-shot (2 text-only demos, OpenFlamingo)", 0) in {(r["method"], r["shots"]) for r in outcome.rows}
    # seeded query subsets: recorded, and another per seed, as the reference draws them
    subsets = results["query_subsets"]
    for seed in (0, 1):
        positions = subsets[str(seed)]["query_positions"]
        ref, _ = _reference_openflamingo_draws(seed, 10, 6, 12, 8, 2)
        assert positions == ref
        assert all(t["query_ids"] == [f"test{p}" for p in positions] for t in trials if t["seed"] == seed)
    assert subsets["0"]["query_positions"] != subsets["1"]["query_positions"]
    # the table says how it was made
    md = (tmp_path / "eval" / "results.md").read_text()
    # a stand-in backbone is labelled as such (AIM's Qwen2-VL rows: the paper used Qwen-VL)
    assert results["backbone"]["substitute_for"] == "Qwen-VL"
    assert "(a substitute for the paper's Qwen-VL: not the paper's backbone)" in outcome.report
    for line in ("Protocol: openflamingo (modified: demo_pool_size=8)", "population std", "3 beam(s), length_penalty 0",
                 "seeded random", "from 8 train examples per seed", "full view", "256 positions"):
        assert line in md, line
    # population std over the two seeds, as np.nanstd
    row = next(r for r in outcome.rows if r["mode"] == "images")
    scores = [t["accuracy"] for t in trials if t["method"] == "images"]
    assert row["accuracy_std"] == pytest.approx(float(np.nanstd(scores)))


def test_true_zero_shot_stays_available_and_labelled_apart(vqa_root, tiny_backbone, tiny_backbone_dir):
    cfg = okvqa_cfg(vqa_root, tiny_backbone_dir, "eval.protocol=openflamingo", "eval.shots=[0]", "eval.seeds=[0]",
                    "eval.num_queries=4", "eval.demo_pool_size=8", "eval.zero_shot=both")
    module = FrozenBackboneModule(cfg, backbone=tiny_backbone)
    rows = run_eval(module, cfg, vqa_root / "eval").rows
    assert {r["method"]: r["demos_shown"] for r in rows} == {
        "zero-shot": 0, "0-shot (2 text-only demos, OpenFlamingo)": 2}


def test_over_context_trial_is_marked_not_scored_and_left_out_of_ratios(vqa_root, tiny_backbone, tiny_backbone_dir,
                                                                        monkeypatch):
    """A tiny LM with 40 positions: zero-shot fits, two image demos do not; the images trial is not run."""
    tiny_backbone.config.text_config.max_position_embeddings = 40
    assert tiny_backbone.max_positions == 40
    cfg = okvqa_cfg(vqa_root, tiny_backbone_dir, "eval.shots=[0,2]", "eval.seeds=[0]", "eval.num_queries=4",
                    "eval.demo_modes=[images]")
    module = FrozenBackboneModule(cfg, backbone=tiny_backbone)
    rec = Recorder(module, monkeypatch)
    outcome = run_eval(module, cfg, vqa_root / "eval")
    results = json.loads((vqa_root / "eval" / "results.json").read_text())
    over = next(t for t in results["trials"] if t["method"] == "images")
    assert over["status"] == "over_context" and over["accuracy"] is None and over["predictions"] is None
    assert over["model_max_positions"] == 40 and over["max_context_tokens"] > 40
    assert not [p for mode, p in rec.prompts if mode == "images"]  # never run
    zero = next(t for t in results["trials"] if t["shots"] == 0)
    assert zero["status"] == "ok" and zero["accuracy"] is not None and zero["max_context_tokens"] <= 40
    row = next(r for r in outcome.rows if r["mode"] == "images")
    assert row["status"] == "over_context" and row["accuracy_mean"] is None
    assert f"over context (needs {over['max_context_tokens']} of 40 positions)" in outcome.report
    # an AIM row beside it: the ratio at that shot count is not computed from an unscored ICL row
    aim = dict(row, method="AIM (fused tokens)", mode="fused", status="ok", accuracy_mean=0.5, context_tokens=20.0)
    assert aim_vs_icl([*outcome.rows, aim]) == []
    # eval.over_context=run: scored, but still flagged and still out of the ratios
    cfg = okvqa_cfg(vqa_root, tiny_backbone_dir, "eval.shots=[0,2]", "eval.seeds=[0]", "eval.num_queries=4",
                    "eval.demo_modes=[images]", "eval.over_context=run")
    outcome = run_eval(FrozenBackboneModule(cfg, backbone=tiny_backbone), cfg, vqa_root / "eval_run")
    row = next(r for r in outcome.rows if r["mode"] == "images")
    assert row["status"] == "over_context" and row["accuracy_mean"] is not None
    assert "(over context: needs" in outcome.report
    assert aim_vs_icl([*outcome.rows, dict(aim)]) == []


def test_openflamingo_rices_runs_vit_l_14(vqa_root, tiny_backbone, tiny_backbone_dir, monkeypatch):
    seen = {}

    def fake_selector(mode, pool, *, episodic=False, clip=None, **kw):
        seen.update(clip or {})
        return eval_loop.DemoSelector(pool, episodic=episodic)

    monkeypatch.setattr(eval_loop, "make_selector", fake_selector)
    cfg = okvqa_cfg(vqa_root, tiny_backbone_dir, "eval.protocol=openflamingo", "eval.shots=[2]", "eval.seeds=[0]",
                    "eval.num_queries=2", "eval.selection=rices")
    run_eval(FrozenBackboneModule(cfg, backbone=tiny_backbone), cfg, vqa_root / "eval")
    assert (seen["model"], seen["pretrained"]) == ("ViT-L-14", "openai")


def test_demo_image_view_base_reads_demos_at_the_base_view_and_queries_at_full(vqa_root, tiny_backbone,
                                                                              tiny_backbone_dir, monkeypatch):
    """eval.demo_image_view=base: demo images go through the backbone's base-view transform, the query's through
    its full one; recorded in results.json."""
    full = tiny_backbone.image_transform
    base_calls = []

    def base_view(image):
        base_calls.append(image.size)
        return full(image)

    monkeypatch.setattr(type(tiny_backbone), "base_view_transform", property(lambda self: base_view))
    cfg = okvqa_cfg(vqa_root, tiny_backbone_dir, "eval.shots=[2]", "eval.seeds=[0]", "eval.num_queries=3",
                    "eval.demo_modes=[images]", "eval.demo_image_view=base")
    run_eval(FrozenBackboneModule(cfg, backbone=tiny_backbone), cfg, vqa_root / "eval")
    results = json.loads((vqa_root / "eval" / "results.json").read_text())
    assert results["protocol_settings"]["demo_image_view"] == "base"
    # demos (16 px train images) are read at the base view, queries (24 px) never
    assert base_calls and set(base_calls) == {(16, 16)}


def _reference_openflamingo_vqa_acc(prediction: str, answers: list[str]) -> float:
    """open_flamingo/eval/vqa_metric.py VQAEval.evaluate, lines 414-431, on answer dicts without ids (its VizWiz and
    TextVQA files), with the same normalisation applied first."""
    from mmict.eval.metrics import normalize_vqa_answer

    res_ans = normalize_vqa_answer(prediction)
    gts = [{"answer": normalize_vqa_answer(a)} for a in answers]
    gt_acc = []
    for gt_ans_datum in gts:
        other_gt_ans = [item for item in gts if item != gt_ans_datum]
        matching_ans = [item for item in other_gt_ans if item["answer"] == res_ans]
        gt_acc.append(min(1, float(len(matching_ans)) / 3))
    return float(sum(gt_acc)) / len(gt_acc)


@pytest.mark.parametrize("answers", [
    ["red"] * 2 + ["blue"] * 8, ["red"] * 3 + ["blue"] * 7, ["red"] * 4 + ["dark red"] * 6, ["Red."] * 10,
    ["blue"] * 10, ["red", "blue", "green", "red", "two", "2", "red", "a red", "red", "x"],
])
def test_openflamingo_vizwiz_scoring_is_its_vqa_eval_on_id_less_answers(answers):
    from mmict.eval.metrics import vqa_accuracy, vqa_accuracy_openflamingo

    assert vqa_accuracy_openflamingo("red", answers) == pytest.approx(_reference_openflamingo_vqa_acc("red", answers))
    if answers == ["red"] * 2 + ["blue"] * 8:  # the official rule removes one answer only: 0.6, not 0.533
        assert vqa_accuracy("red", answers) == pytest.approx(0.6)
        assert vqa_accuracy_openflamingo("red", answers) == pytest.approx(8 / 10 * 2 / 3)


def test_vqa_scoring_follows_the_protocol_on_vizwiz_only():
    of = resolve(eval_cfg(), get_task("vizwiz"), selection="random")
    assert of.vqa_scoring == "openflamingo"
    assert resolve(eval_cfg(protocol="mmict"), get_task("vizwiz"), selection="random").vqa_scoring == "official"
    official = resolve(eval_cfg(vqa_scoring="official"), get_task("vizwiz"), selection="random")
    assert official.label == "openflamingo (modified: vqa_scoring=official)"
