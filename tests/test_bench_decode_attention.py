"""The decode-attention benchmark (evals/bench_decode_attention.py) in its --smoke mode: every variant runs eager and
compiled on a tiny static-cache step on the CPU, and agrees with the plain definition (matmul, masked softmax,
matmul). The GPU figures are the script's own runs on the device."""

import json

from hybrid_mamba3.evals import bench_decode_attention


def test_smoke_runs_every_variant_and_each_agrees(tmp_path):
    res = bench_decode_attention.main(["--smoke", "--out", str(tmp_path)])
    names = {(r["variant"], r["mode"]) for r in res["rows"]}
    assert names == {(v, m) for v in ("repeat", "packed", "op", "enable_gqa", "manual") for m in ("eager", "compiled")}
    for row in res["rows"]:
        assert "error" not in row, row
        assert row["ms"] > 0 and row["max_abs_err"] < 1e-5, row  # fp32: the same sums in another order
    saved = json.loads((tmp_path / "bench_decode_attention.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(res["rows"]))
