"""The model-level benchmark (evals/bench_model.py) in its --smoke mode: every model kind and cache kind runs end to
end on tiny shapes on the CPU, with chunked prefill, and leaves a complete JSON and table. The GPU figures are the
script's own runs on the device."""

import json

import pytest

from hybrid_mamba3.evals import bench_model


def test_smoke_run_covers_every_cell(tmp_path, capsys):
    res = bench_model.main(["--smoke", "--models", "llama,hybrid-50", "--compile-hybrid", "--prefill-chunk", "5",
                            "--out", str(tmp_path)])
    cells = {(c["model"], c["cache"]) for c in res["cells"]}
    assert cells == {(m, c) for m in ("llama", "hybrid-50") for c in bench_model.CACHES}
    for cell in res["cells"]:
        assert "error" not in cell, cell
        assert cell["prefill_tokens_per_s"] > 0 and cell["decode_tokens_per_s"] > 0 and cell["prefill_chunk"] == 5
    saved = json.loads((tmp_path / "bench_model.json").read_text())
    assert saved["cells"] == json.loads(json.dumps(res["cells"])) and saved["table"] == res["table"]
    assert res["table"] in capsys.readouterr().out


def test_bad_arguments_say_what_to_change():
    with pytest.raises(SystemExit, match="unknown model 'mamba'"):
        bench_model.main(["--smoke", "--models", "mamba"])
    with pytest.raises(SystemExit, match="batch x context pairs"):
        bench_model.main(["--smoke", "--settings", "16by2048"])
