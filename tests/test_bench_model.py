"""The model-level benchmark (evals/bench_model.py) in its --smoke mode: every model kind and cache kind runs end to
end on tiny shapes on the CPU, with chunked prefill, and leaves a complete JSON and table. The GPU figures are the
script's own runs on the device."""

import json

import pytest

from hybrid_mamba3.evals import bench_model


def test_smoke_run_covers_every_cell(tmp_path, capsys):
    res = bench_model.main(["--smoke", "--models", "llama,hybrid-50", "--compile-hybrid", "--prefill-chunk", "5",
                            "--caches", ",".join(bench_model.CACHES), "--out", str(tmp_path)])
    cells = {(c["model"], c["cache"]) for c in res["cells"]}
    assert cells == {(m, c) for m in ("llama", "hybrid-50") for c in bench_model.CACHES}
    for cell in res["cells"]:
        assert "error" not in cell, cell
        if cell["cache"] == "train":
            assert cell["train_tokens_per_s"] > 0
            continue
        assert cell["prefill_tokens_per_s"] > 0 and cell["decode_tokens_per_s"] > 0 and cell["prefill_chunk"] == 5
        assert cell["decode_floor_tokens_per_s"] > 0 and cell["step_bytes"]["params"] > 0
    saved = json.loads((tmp_path / "bench_model.json").read_text())
    assert saved["cells"] == json.loads(json.dumps(res["cells"])) and saved["table"] == res["table"]
    assert res["table"] in capsys.readouterr().out


def test_step_bytes_count_weights_keys_values_and_states():
    """The floor's bytes: every parameter, the attention layers' K and V of the context, each Mamba-3 state twice
    (read and written), by hand on the smoke shape (2 of 4 layers attention, 2 kv heads x 16)."""
    import torch

    shape = bench_model.SMOKE_SHAPE
    model = bench_model.build(shape, 0.5, torch.device("cpu"), torch.float32)
    cache = bench_model.make_cache(model, "dynamic", 64)
    with torch.no_grad():
        model(torch.randint(3, 100, (3, 10)), use_cache=True, **{bench_model.cache_kwarg(model): cache})
    got = bench_model.step_bytes(model, cache, batch=3, context=10)
    assert got["params"] == 4 * sum(p.numel() for p in model.parameters())
    assert got["kv"] == 2 * (2 * 3 * 2 * 16 * 10 * 4)  # 2 layers x (K and V) x batch x kv heads x head x ctx x fp32
    mamba = [m for m in model.modules() if type(m).__name__ == "Mamba3"][0]
    B, H, P, N, R = 3, mamba.nheads, mamba.headdim, mamba.d_state, mamba.mimo_rank
    # (angle: N x rope fraction 1/2 / 2 rotation pairs, ssm, last k, last v) per layer, fp32, read and written
    per_layer = B * H * (N // 4) + B * H * P * N + B * R * H * N + B * H * P
    assert got["state"] == 2 * 2 * per_layer * 4
    assert got["total"] == got["params"] + got["kv"] + got["state"]


def test_append_keeps_earlier_cells_and_replaces_remeasured_ones(tmp_path):
    grid = tmp_path / "grid.json"
    bench_model.main(["--smoke", "--models", "llama", "--caches", "dynamic", "--out", str(tmp_path / "a"),
                      "--append", str(grid)])
    bench_model.main(["--smoke", "--models", "llama,hybrid-50", "--caches", "dynamic", "--out", str(tmp_path / "b"),
                      "--append", str(grid)])
    cells = json.loads(grid.read_text())["cells"]
    assert sorted(c["model"] for c in cells) == ["hybrid-50", "llama"]  # llama measured twice: one row
    bench_model.main(["--smoke", "--models", "llama", "--caches", "dynamic", "--out", str(tmp_path / "c"),
                      "--append", str(grid), "--attn", "sdpa_gqa", "--prefill-chunk", "4"])
    cells = json.loads(grid.read_text())["cells"]  # another attention or prefill chunk: a row of its own
    assert sorted((c["model"], c["attn"], c["prefill_chunk"]) for c in cells) == [
        ("hybrid-50", "sdpa", None), ("llama", "sdpa", None), ("llama", "sdpa_gqa", 4)]
    for mode in ("reduce-overhead", "max-autotune"):  # another compile mode: a row of its own, labelled
        bench_model.main(["--smoke", "--models", "llama", "--caches", "static+compile", "--compile-mode", mode,
                          "--out", str(tmp_path / mode), "--append", str(grid)])
    cells = json.loads(grid.read_text())
    assert sorted(str(c.get("compile_mode")) for c in cells["cells"] if c["cache"] == "static+compile") == [
        "None", "max-autotune"]
    assert "static+max-autotune" in cells["table"]  # the last run's table
    other = json.loads(grid.read_text())
    grid.write_text(json.dumps(dict(other, device="NVIDIA H200")))  # a grid another card measured is not mixed in
    with pytest.raises(SystemExit, match="measured on 'NVIDIA H200', this run is on 'cpu'"):
        bench_model.main(["--smoke", "--models", "llama", "--caches", "dynamic", "--out", str(tmp_path / "d"),
                          "--append", str(grid)])
    assert json.loads(grid.read_text())["cells"] == other["cells"]


def test_a_failed_rerun_keeps_the_earlier_figures():
    """--append's merge: a rerun that measured replaces the old row; one that failed (an OOM, a device assert) keeps
    the old figures rather than erasing them, but replaces an old failure; new cells are added."""
    def cell(model, **fig):
        return dict(shape="s", model=model, cache="dynamic", batch=1, context=8, prefill_chunk=None, attn="sdpa",
                    sdpa_backends=None, **fig)

    earlier = [cell("llama", decode_tokens_per_s=10.0), cell("hybrid-50", decode_tokens_per_s=20.0),
               cell("hybrid-75", error="OutOfMemoryError")]
    new = [cell("llama", error="AcceleratorError"), cell("hybrid-50", decode_tokens_per_s=25.0),
           cell("hybrid-75", error="RuntimeError"), cell("hybrid-25", decode_tokens_per_s=5.0)]
    got = {c["model"]: c for c in bench_model.merge_cells(earlier, new)}
    assert len(got) == 4
    assert got["llama"] == earlier[0] and got["hybrid-50"] == new[1]
    assert got["hybrid-75"]["error"] == "RuntimeError" and got["hybrid-25"] == new[3]


def test_bad_arguments_say_what_to_change():
    with pytest.raises(SystemExit, match="unknown model 'mamba'"):
        bench_model.main(["--smoke", "--models", "mamba"])
    with pytest.raises(SystemExit, match="batch x context pairs"):
        bench_model.main(["--smoke", "--settings", "16by2048"])


def test_profile_keeps_each_cells_top_kernels(tmp_path, capsys):
    """--profile N: every decode cell keeps the ops that took its step's time (CPU ops on the CPU; kernels on a GPU),
    largest first, shares of the step's total that add up to at most 1, and prints them under the cell's row. A static
    cache is sized for the profiled steps too (sized for the timed ones alone, they wrote past its end)."""
    res = bench_model.main(["--smoke", "--models", "hybrid-50", "--caches", "dynamic,static", "--profile", "2",
                            "--out", str(tmp_path)])
    assert [c["cache"] for c in res["cells"]] == ["dynamic", "static"]
    assert not any("error" in c for c in res["cells"])
    kernels = res["cells"][1]["decode_kernels"]
    assert 0 < len(kernels) <= 8
    times = [k["ms_per_step"] for k in kernels]
    assert times == sorted(times, reverse=True) and times[0] > 0
    assert 0 < sum(k["share"] for k in kernels) <= 1 + 1e-9
    assert res["cells"][1]["decode_launches_per_step"] >= len(kernels)  # every op listed ran at least once a step
    assert kernels[0]["name"] in capsys.readouterr().out


def test_sdpa_backends_hold_sdpa_to_them_in_a_row_of_their_own(tmp_path, monkeypatch):
    """--sdpa-backends runs each cell inside torch's sdpa_kernel with those backends alone (math here, the one a CPU
    has), labels and keys the row by them; an unknown name is refused."""
    import torch.nn.attention as attention

    held = []
    original = attention.sdpa_kernel
    monkeypatch.setattr(attention, "sdpa_kernel", lambda backends, **kw: held.append(backends) or original(backends))
    grid = tmp_path / "grid.json"
    for extra in ([], ["--sdpa-backends", "math"]):
        bench_model.main(["--smoke", "--models", "llama", "--caches", "dynamic", "--out", str(tmp_path),
                          "--append", str(grid), *extra])
    assert held == [[attention.SDPBackend.MATH]]
    cells = json.loads(grid.read_text())["cells"]
    assert sorted(str(c["sdpa_backends"]) for c in cells) == ["None", "math"]
    assert "llama (sdpa[math])" in bench_model.table(dict(cells=cells))
    with pytest.raises(SystemExit, match="unknown sdpa backend 'cudnn2'"):
        bench_model.main(["--smoke", "--sdpa-backends", "flash,cudnn2"])
