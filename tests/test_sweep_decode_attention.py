"""The decode-attention launch sweep (evals/kernel_dev/sweep_decode_attention.py) in its --smoke mode: on the CPU,
Triton's interpreter, tiny cells. Its GPU figures are the script's own runs on the device
(evals/results/sweep_decode_attention_h100.json)."""

import json
import os

import pytest

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the smoke run is for CPU machines (Triton's interpreter)", allow_module_level=True)

from hybrid_mamba3.evals.kernel_dev import sweep_decode_attention as sweep  # noqa: E402


def test_smoke_times_every_setting_at_every_cell_and_ranks_them(tmp_path):
    res = sweep.main(["--smoke", "--out", str(tmp_path)])
    cells = {(r["shape"], r["batch"], r["length"]) for r in res["rows"]}
    assert cells == {("smollm2", 2, 300), ("llama", 1, 40)}
    for c in cells:
        mine = [r for r in res["rows"] if (r["shape"], r["batch"], r["length"]) == c]
        assert [r["variant"] for r in mine] == ["sdpa"] + ["split_kv"] * 4
        assert len({sweep.key(r) for r in mine[1:]}) == 4  # the 2 x 2 grid, each setting once
        for r in mine[1:]:
            assert "error" not in r and r["ms"] > 0 and r["max_abs_err"] < 1e-5, r  # fp32 against sdpa
    ranked = res["ranking"]
    assert len(ranked) == 4 and ranked[0]["geo_mean"] >= 1.0 and ranked[-1]["geo_mean"] >= ranked[0]["geo_mean"]
    assert all(r["worst"] >= r["geo_mean"] for r in ranked)
    saved = json.loads((tmp_path / "sweep_decode_attention.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(res["rows"])) and saved["table"] == res["table"]


def test_ranking_arithmetic():
    """Two settings at two cells: A is best at one, B at the other by 4x; A's geometric mean is sqrt(1 x 2)."""
    base = dict(num_warps=4, num_stages=2, skip_masked=True, programs_per_sm=2)
    rows = [dict(shape="s", batch=1, length=n, variant="split_kv", block_n=bn, ms=ms, **base)
            for n, bn, ms in ((10, 64, 1.0), (10, 128, 4.0), (20, 64, 2.0), (20, 128, 1.0))]
    ranked = sweep.ranking(rows)
    assert [r["launch"]["block_n"] for r in ranked] == [64, 128]
    assert ranked[0]["geo_mean"] == pytest.approx(2 ** 0.5) and ranked[0]["worst"] == 2.0
    assert ranked[1]["geo_mean"] == pytest.approx(2.0) and ranked[1]["worst"] == 4.0


@pytest.mark.parametrize("args,message", [(["--cells", "gpt:1x8"], "cell 'gpt:1x8'"),
                                          (["--grid", "tile=64"], "grid axis 'tile=64'")])
def test_bad_cells_and_grids_are_named(args, message):
    with pytest.raises(SystemExit, match=message):
        sweep.main(["--smoke"] + args)
