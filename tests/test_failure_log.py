"""The failure log of device runs (tests/failure_log.py): failures reach $HM3_REPORT_DIR/failures.log as they happen."""


def test_failures_are_logged_as_they_happen(pytester, monkeypatch, tmp_path):
    out = tmp_path / "report"
    monkeypatch.setenv("HM3_REPORT_DIR", str(out))
    pytester.makepyfile(test_mod="""
        def test_ok():
            pass

        def test_broken():
            assert 1 + 1 == 3, "arithmetic moved"
    """)
    result = pytester.runpytest("-p", "failure_log", "-q")
    result.assert_outcomes(passed=1, failed=1)
    log = (out / "failures.log").read_text()
    assert "=== test_mod.py::test_broken (call)" in log
    assert "arithmetic moved" in log
    assert "test_ok" not in log


def test_nothing_is_written_without_a_report_dir(pytester, monkeypatch):
    monkeypatch.delenv("HM3_REPORT_DIR", raising=False)
    pytester.makepyfile(test_mod="def test_broken():\n    assert False\n")
    pytester.runpytest("-p", "failure_log", "-q").assert_outcomes(failed=1)
    assert not list(pytester.path.rglob("failures.log"))
