"""configurator.py: nanoGPT-style overrides, and one-line errors for every mistake a user makes."""

import pytest

from configurator import configure


def defaults():
    return {"learning_rate": 6e-4, "max_iters": 100, "compile": True, "out_dir": "out", "betas": (0.9, 0.95),
            "init_from": "scratch", "_private": 1, "peak": None}


def test_command_line_values_are_parsed_as_python_literals():
    ns = defaults()
    config = configure(ns, ["--learning_rate=3e-4", "--compile=False", "--max_iters=7", "--betas=(0.8, 0.9)"])
    assert config["learning_rate"] == 3e-4 and config["compile"] is False and config["max_iters"] == 7
    assert ns["betas"] == (0.8, 0.9) and config == {k: ns[k] for k in config}
    assert "_private" not in config


def test_string_keys_take_the_raw_text():
    config = configure(defaults(), ["--out_dir=123", "--init_from=resume"])
    assert config["out_dir"] == "123" and config["init_from"] == "resume"


def test_an_int_is_accepted_for_a_float_and_converted():
    config = configure(defaults(), ["--learning_rate=1"])
    assert config["learning_rate"] == 1.0 and isinstance(config["learning_rate"], float)


def test_config_file_runs_in_the_namespace_and_flags_apply_after_it(tmp_path):
    path = tmp_path / "x.py"
    path.write_text("import math\n_helper = 3\nmax_iters = _helper * 10\nlearning_rate = math.sqrt(1e-6)\n")
    config = configure(defaults(), [str(path), "--max_iters=5"])
    assert config["max_iters"] == 5 and config["learning_rate"] == pytest.approx(1e-3)


@pytest.mark.parametrize("argv, message", [
    (["--learnig_rate=1"], "unknown key 'learnig_rate' on the command line; did you mean --learning_rate?"),
    (["--max_iters=1.5"], "max_iters=1.5 on the command line is a float, but max_iters expects a int"),
    (["--max_iters=True"], "is a bool, but max_iters expects a int"),
    (["--compile=1"], "is a int, but compile expects a bool"),
    (["--max_iters"], "'--max_iters' has no value"),
    (["missing/config.py"], "config file 'missing/config.py' not found"),
])
def test_mistakes_stop_with_a_one_line_error(argv, message):
    with pytest.raises(SystemExit) as e:
        configure(defaults(), argv)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_unknown_or_mistyped_keys_in_a_config_file_are_errors(tmp_path):
    path = tmp_path / "x.py"
    path.write_text("max_iter = 10\n")
    with pytest.raises(SystemExit, match="unknown key 'max_iter' in .*x.py; did you mean --max_iters"):
        configure(defaults(), [str(path)])
    path.write_text("compile = 'yes'\n")
    with pytest.raises(SystemExit, match="compile='yes' in .*x.py is a str"):
        configure(defaults(), [str(path)])


def test_a_none_default_accepts_any_value():
    assert configure(defaults(), ["--peak=2e14"])["peak"] == 2e14
