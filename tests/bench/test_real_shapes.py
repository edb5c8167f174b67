"""Issue 24 items 4-5: the real-shape benchmark and the one GPU command, on the CPU path (timings never asserted)."""

from __future__ import annotations

import json

import pytest
import torch

from bench.gpu_checks import main as gpu_checks
from bench.real_shapes import _targets
from bench.shapes import SHAPES, llava_parts, qwen_parts, resolve_shapes


@pytest.fixture(scope="module")
def cpu_results(tmp_path_factory):
    """`python -m bench.gpu_checks --smoke` on the CPU: real_shapes at the smoke shapes (the reduced architectures
    with small images and a 96-position LLaVA), the other sections reported as skipped."""
    root = tmp_path_factory.mktemp("gpu_checks")
    threads = torch.get_num_threads()
    try:
        assert gpu_checks(["--smoke", "--threads", "1", "--root", str(root), "--out", str(root / "r.json"),
                           "--only", "real_shapes,fp32,eval_scaling"]) == 0
    finally:
        torch.set_num_threads(threads)  # --threads is process-wide: later tests keep theirs
    return json.loads((root / "r.json").read_text())


def test_gpu_command_names_the_device_and_reports_every_section(cpu_results):
    r = cpu_results
    assert r["device"].startswith("CPU") and r["machine"]["cpu_count"] and "torch" in r["versions"]
    sections = r["sections"]
    assert sections["real_shapes"]["status"] == "ok"
    assert sections["training"]["status"].startswith("skipped: needs a CUDA GPU")
    assert sections["eval_scaling"]["status"].startswith("skipped: the CPU path")


def test_real_shapes_rows_mark_over_context_and_keep_the_token_arithmetic(cpu_results):
    bench = cpu_results["sections"]["real_shapes"]["benchmarks"]["real_shapes"]
    assert bench["status"] == "ok", bench.get("traceback")
    models = bench["settings"]["models"]
    assert set(models) == {"smoke-llava", "smoke-qwen2-vl"}
    assert models["smoke-llava"]["max_positions"] == 96 and models["smoke-llava"]["largest_vanilla_shots"] == 1
    assert models["smoke-llava"]["attention"] == "sdpa"
    rows = {(r["model"], r["batch"], r["shots"]): r for r in bench["rows"]}
    # the largest shot count vanilla ICL fits (1) joins the sweep (0, 2), at both batch sizes
    assert sorted(k for (m, b, k) in rows if m == "smoke-llava" and b == 2) == [0, 1, 2]
    over = rows[("smoke-llava", 2, 2)]
    assert over["vanilla_context"] > 96 and over["vanilla_status"] == "over context"
    assert "vanilla_ms" not in over and "speedup" not in over  # not run, not compared
    assert over["aim+bank_status"] == "ok" and over["aim+bank_ms"] > 0 and over["aim+bank_qps"] > 0
    for (model, batch, k), row in rows.items():
        tokens = models[model]["image_tokens"]
        # vanilla ICL pays each demo's image tokens; AIM+bank as many tokens as the text floor
        assert row["vanilla_context"] - row["aim+bank_context"] == k * tokens
        assert row["aim+bank_context"] == row["text_context"]
        if row["vanilla_status"] == "ok":
            assert row["speedup"] > 0 and row["vanilla_qps"] == pytest.approx(1000 * batch / row["vanilla_ms"])
            assert "vanilla_peak_mib" in row  # None only where memory cannot be measured
    names = [t["name"] for t in bench["targets"]]
    assert any("smoke-llava, batch 1, 1 shots (the most vanilla ICL fits" in n for n in names)
    floor = [t for t in bench["targets"] if "text-only floor" in t["name"]]
    assert len(floor) == 2 and all(t["measured"] > 0 and t["met"] in (True, False) for t in floor)


def _row(shots, status="ok", speedup=6.0, memory=5.0, vs_text=1.1, peak=100.0):
    row = {"model": "m", "batch": 1, "shots": shots, "image_tokens": 576, "max_positions": 4096,
           "vanilla_status": status, "vanilla_context": 600 * (shots + 1), "vs_text": vs_text,
           "aim+bank_peak_mib": peak + shots, "text_peak_mib": peak + shots, "vanilla_peak_mib": peak * (shots + 1)}
    if status != "over context":
        row.update(speedup=speedup, memory_ratio=memory, ratios_are_results=status == "ok")
    return row


def test_targets_judge_only_the_16_shot_cell_within_context():
    met = _targets([_row(0), _row(16)], {"m": {"largest_vanilla_shots": 16}}, ("m",))
    judged = {t["name"].split(",")[0]: t["met"] for t in met}
    assert judged["AIM+bank speed-up over vanilla ICL"] is True
    assert judged["AIM+bank activation memory below vanilla ICL"] is True
    assert all(t["met"] is True for t in met)  # flat memory, and 1.1x the text floor

    missed = _targets([_row(0), _row(16, speedup=3.0, memory=2.0, vs_text=1.3)], {"m": {"largest_vanilla_shots": 16}},
                      ("m",))
    assert [t["met"] for t in missed] == [False, False, True, False]

    over = _targets([_row(0), _row(5), _row(16, "over context")], {"m": {"largest_vanilla_shots": 5}}, ("m",))
    speed = [t for t in over if "speed-up" in t["name"]]
    assert speed[0]["met"] is None and "not measured (vanilla ICL 10200 positions > 4096" in speed[0]["name"]
    assert speed[1]["met"] is None and "5 shots (the most vanilla ICL fits" in speed[1]["name"]
    assert speed[1]["measured"] == 6.0

    past = _targets([_row(0), _row(16, "past limit (speed only)")], {"m": {"largest_vanilla_shots": 5}}, ("m",))
    assert all(t["met"] is None for t in past if "speed" in t["name"] or "memory below" in t["name"])
    assert any("speed only, not the target" in t["name"] and t["measured"] == 6.0 for t in past)


def test_7b_shapes_have_the_published_sizes_without_weights():
    """Built on the meta device (no memory): the parameter counts of llava-hf/llava-1.5-7b-hf and
    Qwen/Qwen2-VL-7B-Instruct, and 576 image tokens per 336 px (LLaVA) or 672 px (Qwen2-VL) image."""
    from PIL import Image

    expected = {"llava-1.5-7b": 7_063_427_072, "qwen2-vl-7b": 8_291_375_616}
    for shape, count in expected.items():
        spec = SHAPES[shape]
        model_cls, config, (_, processor) = (llava_parts if spec["family"] == "llava" else qwen_parts)(spec)
        with torch.device("meta"):
            model = model_cls._from_config(config, dtype=torch.bfloat16)
        assert sum(p.numel() for p in model.parameters()) == count
        out = processor(images=Image.new("RGB", (spec["image_side"],) * 2), return_tensors="pt")
        if "image_grid_thw" in out:  # 48 x 48 patches, merged 2 x 2
            assert int(out["image_grid_thw"].prod()) // spec["vision"]["spatial_merge_size"] ** 2 == 576
        else:
            assert (spec["vision"]["image_size"] // spec["vision"]["patch_size"]) ** 2 == 576


def test_shapes_resolve_by_device_and_refuse_7b_on_a_cpu():
    assert resolve_shapes(None, cuda=True, smoke=False) == ("qwen2-vl-7b", "llava-1.5-7b")
    assert resolve_shapes(None, cuda=False, smoke=False) == ("reduced-qwen2-vl", "reduced-llava")
    assert resolve_shapes(("reduced", "reduced-llava"), cuda=False, smoke=False) == ("reduced-qwen2-vl",
                                                                                      "reduced-llava")
    with pytest.raises(ValueError, match="needs a CUDA GPU.*--shapes reduced"):
        resolve_shapes(("7b",), cuda=False, smoke=False)
    with pytest.raises(ValueError, match="unknown shape 'llava-7b'"):
        resolve_shapes(("llava-7b",), cuda=True, smoke=False)
