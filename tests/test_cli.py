"""`slm-convert` tells a person what is wrong in one line, with the exit status to match."""

from assets import cli
from pipeline import rawzone
from tests.conftest import quiet_dagster_home


def test_missing_landing_folder_is_one_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SLM_LANDING_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setenv("SLM_OUTPUT_DIR", str(tmp_path / "out"))
    assert cli.main(["run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slm-convert: Landing folder") and "SLM_LANDING_DIR" in err


def test_logs_without_a_single_usable_call_stop_the_run_with_the_reason(tmp_path, monkeypatch, capsys):
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "broken.jsonl").write_text('{"id": 42, "request": {"messages": []}, "response": {}}\nnot json\n')
    monkeypatch.setenv("SLM_LANDING_DIR", str(landing))
    monkeypatch.setenv("SLM_OUTPUT_DIR", str(tmp_path / "out"))
    monkeypatch.setenv("DAGSTER_HOME", str(quiet_dagster_home(tmp_path / "dagster_home")))
    for name, value in rawzone.new_keys().items():
        monkeypatch.setenv(name, value)
    assert cli.main(["run"]) == 1
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("The run failed: step raw_traces: No usable LLM call in 1 file(s)")
    assert "2 lines or files quarantined ({'id is missing or not a string': 1, 'invalid JSON': 1})" in last_line
    assert len(list((tmp_path / "out" / "raw" / "quarantine").rglob("part-*.parquet.enc"))) == 1


def test_summary_before_any_run_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SLM_OUTPUT_DIR", str(tmp_path / "out"))
    assert cli.main(["summary"]) == 2
    assert "run `slm-convert run` first" in capsys.readouterr().err


def test_a_missing_run_config_file_is_reported(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SLM_OUTPUT_DIR", str(tmp_path / "out"))
    assert cli.main(["run", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml does not exist" in capsys.readouterr().err
