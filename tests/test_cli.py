"""The `kka` command line: config printing, errors that name the field, help text."""

import subprocess
import sys

import yaml

from kka_ray.cli import main


def test_config_prints_resolved_yaml(capsys):
    assert main(["config", "run.iterations=5", "run.mode=rep"]) == 0
    tree = yaml.safe_load(capsys.readouterr().out)
    assert tree["run"]["iterations"] == 5 and tree["run"]["mode"] == "rep"


def test_bad_override_exits_2_naming_the_field(capsys):
    assert main(["config", "drawer.guidance=3"]) == 2
    assert "config field 'drawer.guidance'" in capsys.readouterr().err
    assert main(["run", "run.iterations=-1"]) == 2
    assert "run.iterations" in capsys.readouterr().err


def test_run_refuses_an_existing_run_directory(tmp_path, capsys):
    (tmp_path / "state.json").write_text("{}")
    assert main(["run", "--output", str(tmp_path)]) == 2
    assert "--resume" in capsys.readouterr().err


def test_console_script_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "kka_ray.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("run", "prepare", "config", "report"):
        assert cmd in out


def test_wrong_input_is_one_error_line_not_a_traceback(tmp_path, capsys):
    # a job server address Ray cannot read
    assert main(["status", "kka-run-x", "--address", "foo"]) == 2
    assert "'foo' is not a reachable Ray job server address" in capsys.readouterr().err
    # drawer training options come after `prepare drawer`
    assert main(["prepare", "--cache", str(tmp_path), "drawer"]) == 2
    assert "kka prepare drawer OUT_DIR" in capsys.readouterr().err
    # kka eval reads run directories, not storage URIs
    assert main(["eval", "s3://bucket/kka/run1"]) == 2
    assert "not storage URIs (s3://bucket/kka/run1)" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--detectors", "svm"]) == 2
    assert "unknown detector(s) ['svm']" in capsys.readouterr().err
