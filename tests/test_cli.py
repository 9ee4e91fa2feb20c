import pytest

from fuseflow.cli import EXAMPLES, PASSTHROUGH, main


@pytest.mark.parametrize("argv", [[c] for c in EXAMPLES] + [["teacher", "serve"]] + [[c] for c in PASSTHROUGH if c != "teacher"])
def test_every_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    assert "usage: fuseflow " + " ".join(argv) in capsys.readouterr().out


def test_config_error_is_one_line_naming_the_field(tmp_path, capsys):
    p = tmp_path / "run.yaml"
    p.write_text("target: {model: x}\nsources: [{model: y}]\ntrain: {lrr: 1}\n")
    assert main(["config", str(p)]) == 2
    err = capsys.readouterr().err
    assert "train.lrr: unknown field" in err and "Traceback" not in err


def test_merge_config_errors_name_the_field_and_the_override(tmp_path, capsys):
    p = tmp_path / "merge.yaml"
    p.write_text("method: linear\nbase: b\nmodels: [m]\noutput: o\nmodles: [a]\n")
    assert main(["merge", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fuseflow merge: error: ") and "Traceback" not in err
    assert "modles: unknown field (typo?)" in err
    assert main(["merge", str(p), "threads"]) == 2
    assert "override 'threads' is not of the form key=value" in capsys.readouterr().err


def test_config_prints_every_default(tmp_path, capsys):
    p = tmp_path / "run.yaml"
    p.write_text("target: {model: x}\nsources: [{model: y}]\n")
    assert main(["config", str(p), "fusion.lam=0.5"]) == 0
    out = capsys.readouterr().out
    assert "lam: 0.5" in out and "warmup_ratio: 0.008" in out
