"""The CLI lists every DESIGN.md command, unbuilt ones fail clearly, and configs reject unknown keys."""
import subprocess
import sys

import pytest

from pipeline import cli
from pipeline.common import ErrorLog, InputError, atomic_path, atomic_write_json, config_hash
from pipeline.config import load_config, parse_override

DESIGN_COMMANDS = ["synth", "clips", "label", "refresh", "train-teacher", "train-student", "train-fpt",
                   "export", "convert-lras", "flow", "eval", "inspect", "demo"]


def test_help_lists_every_design_command():
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for name in DESIGN_COMMANDS:
        assert name in out, name


def test_unbuilt_command_says_so_and_fails(capsys):
    unbuilt = [n for n, (mod, _) in cli.COMMANDS.items() if mod is None]
    if not unbuilt:
        pytest.skip("every command is built")
    assert cli.main([unbuilt[0]]) != 0
    assert "not built yet" in capsys.readouterr().err


def test_overrides_and_unknown_keys(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("a: {b: 1, c: [1, 2]}\nseed: 3\n")
    defaults = {"a": {"b": 0, "c": []}, "seed": 0, "name": "x"}
    cfg = load_config(cfg_file, ["a.b=7", "name=y z"], defaults)
    assert cfg == {"a": {"b": 7, "c": [1, 2]}, "seed": 3, "name": "y z"}
    assert defaults["a"]["b"] == 0  # defaults untouched
    with pytest.raises(InputError, match="unknown config key 'bee'"):
        load_config(None, ["a.bee=1"], defaults)
    with pytest.raises(InputError, match="key.sub=value"):
        parse_override("novalue")
    with pytest.raises(InputError, match="config file not found"):
        load_config(tmp_path / "missing.yaml", [], defaults)


def test_free_form_option_takes_several_overrides(tmp_path):
    """A key whose default is None (e.g. a tracer override) is free-form: one --set per sub-key, any number of
    them, from the file or the command line; keys beside it stay checked."""
    defaults = {"src": {"teacher": None, "tracer": None, "threads": 1}}
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("src: {tracer: {sigma: 1.0}}\n")
    cfg = load_config(cfg_file, ["src.tracer.num_masks=1", "src.tracer.zoom_levels=2", "src.teacher=t"], defaults)
    assert cfg == {"src": {"teacher": "t", "tracer": {"sigma": 1.0, "num_masks": 1, "zoom_levels": 2}, "threads": 1}}
    with pytest.raises(InputError, match="unknown config key 'thread'"):
        load_config(None, ["src.tracer.a=1", "src.thread=2"], defaults)
    assert load_config(None, ["free.a=1", "free.b=2"]) == {"free": {"a": 1, "b": 2}}    # no defaults: no checks


def test_bad_config_exits_2_with_message(tmp_path, capsys):
    assert cli.main(["demo", "--set", "nonsense_key=1"]) == 2
    assert "nonsense_key" in capsys.readouterr().err


def test_atomic_path_publishes_nothing_on_error(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    atomic_write_json(target, {"b": 1, "a": 2})
    assert target.read_text().startswith('{\n  "a": 2')
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_error_log_appends_jsonl(tmp_path):
    log = ErrorLog(tmp_path / "errors.jsonl")
    log.record("a.mp4", InputError("a.mp4", "truncated"))
    log.record("b.mp4", "zero frames", stage="decode")
    lines = (tmp_path / "errors.jsonl").read_text().splitlines()
    assert len(lines) == 2 and log.count == 2
    assert '"reason": "truncated"' in lines[0] and '"stage": "decode"' in lines[1]


def test_config_hash_ignores_key_order():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
