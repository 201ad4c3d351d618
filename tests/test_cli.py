import subprocess
import sys

import pytest

from hybrid_mamba3.cli import main, parse_layers


def test_parse_layers():
    assert parse_layers("0.25") == 0.25 and parse_layers("1,5,9") == [1, 5, 9] and parse_layers("3") == [3]
    assert parse_layers("aam") == "aam"
    with pytest.raises(Exception, match="fraction"):
        parse_layers("half")


def test_demo_runs_and_saves(tmp_path, capsys):
    rc = main(["demo", "--layers", "4", "--mamba-layers", "AM", "--max-new-tokens", "4", "--prompt-len", "5",
               "--save", str(tmp_path / "h")])
    out = capsys.readouterr().out
    assert rc == 0 and "cached decoding == uncached forward: True" in out and "layout AMAM" in out
    assert (tmp_path / "h" / "model.safetensors").exists()


def test_console_script_reports_bad_input():
    res = subprocess.run([sys.executable, "-m", "hybrid_mamba3.cli", "demo", "--layers", "4", "--mamba-layers", "7"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "out of range" in res.stderr
