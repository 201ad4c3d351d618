"""The decode-attention benchmark (evals/bench_decode_attention.py) in its --smoke mode: every variant runs eager and
compiled on a tiny static-cache step on the CPU, and agrees with the plain definition (matmul, masked softmax,
matmul). The GPU figures are the script's own runs on the device."""

import json

from hybrid_mamba3.evals import bench_decode_attention


def test_smoke_runs_every_variant_and_each_agrees(tmp_path):
    """Every variant eager and compiled, the sdpa ones on each backend over a static and a growing cache; each within
    fp32 rounding of the plain definition; the JSON holds the rows printed."""
    res = bench_decode_attention.main(["--smoke", "--out", str(tmp_path)])
    names = {(r["variant"], r["mode"], r["backend"], r["cache"]) for r in res["rows"]}
    every = {(v, m, "default", "static") for v in ("repeat", "packed", "enable_gqa", "manual", "split_kv")
             for m in ("eager", "compiled")}
    sdpa = {(v, "eager", b, c) for v in ("packed", "enable_gqa") for b in ("default", "math")
            for c in ("static", "growing")}  # on each backend alone, over a static and a growing cache
    assert names == every | sdpa and len(res["rows"]) == len(names)
    for row in res["rows"]:
        assert "error" not in row, row
        assert row["ms"] > 0 and row["wall_ms"] > 0 and row["max_abs_err"] < 1e-5, row  # fp32: sums reordered
    saved = json.loads((tmp_path / "bench_decode_attention.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(res["rows"]))


def test_an_unknown_backend_is_named():
    import pytest

    with pytest.raises(SystemExit, match="unknown sdpa backend.*'tpu'"):
        bench_decode_attention.main(["--smoke", "--backends", "default,tpu"])
