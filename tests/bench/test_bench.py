"""`python -m bench`: the harness runs end to end on tiny sizes and writes results.json. Timings are never asserted."""

from __future__ import annotations

import json

import pytest

from bench import REGISTRY, Benchmark
from bench.__main__ import main

pytestmark = pytest.mark.slow
SMOKED = ("latency", "floor", "lightning", "data", "pool")


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results.json"
    # real_shapes and eval_scaling run in their own tests (test_real_shapes.py, ...), not a second time here
    assert main(["--smoke", "--only", ",".join(SMOKED), "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_results_json_has_machine_versions_and_every_benchmark(smoke_results):
    r = smoke_results
    assert r["mode"] == "smoke" and r["repeats"] == 1
    assert {"cpu_count", "torch_threads", "platform"} <= set(r["machine"])
    assert {"torch", "transformers", "lightning", "safetensors", "mmict_commit"} <= set(r["versions"])
    assert set(r["benchmarks"]) == set(SMOKED)
    assert r["benchmarks"]["data"]["status"] in ("ok", "not available")  # the data issue's benchmark
    assert all(b["seconds"] >= 0 for b in r["benchmarks"].values())
    for name in ("latency", "floor", "lightning"):
        b = r["benchmarks"][name]
        assert b["status"] == "ok", b.get("traceback")
        assert b["rows"] and b["table"].startswith("| ") and b["targets"]
        assert all({"name", "target", "measured", "met"} <= set(t) for t in b["targets"])
    assert "| latency |" in r["summary"] or "| floor |" in r["summary"]


def test_latency_rows_compare_the_three_methods_with_real_token_arithmetic(smoke_results):
    rows = smoke_results["benchmarks"]["latency"]["rows"]
    assert [row["shots"] for row in rows] == [0, 2]
    for row in rows:
        for method in ("vanilla", "aim", "aim+bank", "text"):
            assert row[f"{method}_ms"] > 0 and len(row[f"{method}_ms_all"]) == 1
            assert f"{method}_peak_mib" in row  # None only where memory cannot be measured
    zero, two = rows
    assert zero["vanilla_context"] == zero["aim+bank_context"]  # no demos: the same prompt
    # vanilla ICL pays every demo's image tokens; AIM only its text tokens (the text demos as many)
    saved = two["vanilla_context"] - two["aim+bank_context"]
    assert saved == 2 * zero["image_tokens"] and two["aim+bank_context"] == two["text_context"]
    assert smoke_results["benchmarks"]["latency"]["settings"]["bank_builds"]["smoke"]["demos"] == 2


def test_pool_rows_compare_the_in_ram_pool_with_the_indexed_one(smoke_results):
    b = smoke_results["benchmarks"]["pool"]
    assert b["status"] == "ok", b.get("traceback")
    small, large = b["rows"]
    assert small["pool_size"] < large["pool_size"]
    for row in (small, large):  # memory, not time: the indexed pool keeps no image however many it read
        assert row["indexed_image_bytes_held_mib"] == 0 and row["full_image_bytes_held_mib"] > 0
    assert b["settings"]["random_access"]["read_us"] > 0


def test_floor_prompts_have_the_same_length(smoke_results):
    for row in smoke_results["benchmarks"]["floor"]["rows"]:
        assert row["context_aim"] == row["context_text_demos"]


def test_only_unknown_names_and_unwritten_benchmarks(tmp_path, capsys, monkeypatch):
    def unwritten(ctx):
        raise NotImplementedError("written by another issue")

    def broken(ctx):
        raise RuntimeError("boom")

    monkeypatch.setitem(REGISTRY, "unwritten", Benchmark("unwritten", "a placeholder", unwritten))
    monkeypatch.setitem(REGISTRY, "broken", Benchmark("broken", "fails", broken))
    out = tmp_path / "r.json"
    assert main(["--only", "unwritten", "--smoke", "--out", str(out)]) == 0  # reported, not a failure
    result = json.loads(out.read_text())["benchmarks"]
    assert set(result) == {"unwritten"} and result["unwritten"]["status"] == "not available"
    assert "not available: written by another issue" in capsys.readouterr().out
    assert main(["--only", "broken,unwritten", "--smoke", "--out", str(out)]) == 1  # the others still run
    result = json.loads(out.read_text())["benchmarks"]
    assert result["broken"]["status"] == "failed" and "boom" in result["broken"]["reason"]
    assert result["unwritten"]["status"] == "not available"
    with pytest.raises(SystemExit, match="unknown benchmark"):
        main(["--only", "latncy", "--out", str(out)])
    assert main(["--list"]) == 0
    assert "lightning" in capsys.readouterr().out
