import glob
import os
import dataclasses
from dataclasses import dataclass, field

import pytest

from gptkit.configurator import BaseConfig, ConfigError, load_config
from gptkit.train_config import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_defaults_and_flags():
    cfg = load_config(TrainConfig, ["--max_steps=1e3", "--dropout=0", "--bias=true", "--compile=False",
                                    "--learning_rate=1", "--out_dir=out/x"])
    assert cfg.max_steps == 1000 and isinstance(cfg.max_steps, int)
    assert cfg.dropout == 0.0 and isinstance(cfg.dropout, float)
    assert cfg.bias is True and cfg.compile is False
    assert cfg.learning_rate == 1.0 and cfg.out_dir == "out/x"


def test_unknown_key_names_closest():
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        load_config(TrainConfig, ["--learning_rat=1e-3"])


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "c.py"
    path.write_text("n_layers = 4\n")
    with pytest.raises(ConfigError, match=r"n_layers.*c\.py.*did you mean 'n_layer'"):
        load_config(TrainConfig, [str(path)])


def test_wrong_type_names_key_and_type():
    with pytest.raises(ConfigError, match="max_steps.*int"):
        load_config(TrainConfig, ["--max_steps=1.5"])
    with pytest.raises(ConfigError, match="compile.*bool"):
        load_config(TrainConfig, ["--compile=yes"])
    with pytest.raises(ConfigError, match="learning_rate.*float"):
        load_config(TrainConfig, ["--learning_rate=fast"])
    for value in ("nan", "inf", "-inf"):  # they parse as floats, then crash deep inside a run
        with pytest.raises(ConfigError, match=f"weight_decay='{value}': expected a finite number"):
            load_config(TrainConfig, [f"--weight_decay={value}"])


@pytest.mark.parametrize("flag, says", [
    ("--learning_rate=0", "learning_rate=0.0 must be positive"),
    ("--learning_rate=-1", "learning_rate=-1.0 must be positive"),
    ("--min_lr=-1e-5", "min_lr=-1e-05 must be between 0 and learning_rate"),
    ("--total_batch_tokens=0", "total_batch_tokens=0 must be positive"),
    ("--grad_clip=-1", "grad_clip=-1.0 must be 0"),
    ("--beta2=1", r"beta2=1.0 must be in \[0, 1\)"),
    ("--n_head=0", "n_layer, n_head and n_embd must be positive"),
    ("--out_dir=", "out_dir is empty: give a folder, such as --out_dir=out/fineweb_124m"),
    ("--data_dir= ", "data_dir is empty"),
])
def test_training_settings_that_cannot_train_are_refused(flag, says):
    with pytest.raises(ConfigError, match=says):
        load_config(TrainConfig, [flag])


def test_config_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin.py"
    path.write_bytes('out_dir = "caf\u00e9"\n'.encode("cp1252"))
    with pytest.raises(ConfigError, match=r"latin\.py is not UTF-8.*save it as UTF-8"):
        load_config(TrainConfig, [str(path)])


def test_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("n_layer = 4\nn_head = = 2\n")
    with pytest.raises(ConfigError, match=r"broken\.py, line 2"):
        load_config(TrainConfig, [str(path)])


def test_files_then_flags_override_in_order(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("n_layer = 4\nn_head = 4\nimport math\nn_embd = 2 ** 7\n")
    b.write_text("n_layer = 6\n")
    cfg = load_config(TrainConfig, [str(a), str(b), "--n_head=2"])
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd) == (6, 2, 128)
    cfg = load_config(TrainConfig, ["--n_layer=3", str(a)])
    assert cfg.n_layer == 4  # later wins


def test_cross_field_checks_report_everything():
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, ["--n_embd=100", "--n_head=3", "--optimizer=sgd", "--total_batch_tokens=1000"])
    message = str(e.value)
    assert "n_embd" in message and "optimizer" in message and "total_batch_tokens" in message
    assert message.startswith("3 problems with the configuration:\n  - ")  # n_embd/n_head is one
    with pytest.raises(ConfigError) as e:  # one problem: one line, as scripts print it after "error: "
        load_config(TrainConfig, ["--optimizer=sgd"])
    assert "\n" not in str(e.value) and str(e.value).startswith("optimizer='sgd'")


def test_list_and_optional_fields():
    @dataclass
    class C(BaseConfig):
        sources: list[str] = field(default_factory=lambda: ["a"])
        limit: int | None = None
    cfg = load_config(C, ["--sources=x.json,y.jsonl", "--limit=5"])
    assert cfg.sources == ["x.json", "y.jsonl"] and cfg.limit == 5
    assert load_config(C, ["--limit=None"]).limit is None


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "config", "*.py"))))
def test_every_config_file_loads(path, tmp_path):
    # Each recipe holds keys for several scripts: every key is known to one of them, and every script
    # that reads a key gets a value of its type (a script checks only its own keys' types).
    import importlib
    from gptkit.configurator import SCRIPT_CONFIGS, _read_config_file
    keys = set(_read_config_file(path))
    classes = [getattr(importlib.import_module(source[:-3].replace("/", ".")), name) for source, name in SCRIPT_CONFIGS]
    known = set()
    for cls in classes:
        fields = {f.name for f in dataclasses.fields(cls)}
        known |= fields
        if keys & fields:
            unchecked = type(cls.__name__, (cls,), {"validate": lambda self: []})  # paths exist only after a run
            load_config(unchecked, [path])
    assert keys <= known, keys - known
    # and the scripts a recipe is for accept it whole, cross-field checks included
    from gptkit.train_config import FinetuneConfig
    from prepare_fineweb import PrepareConfig
    from prepare_instruct import InstructConfig
    # (a local source that an earlier step of the recipe writes, such as prepare_toy_task.py's, stands
    # in as an empty file, in a folder of its own)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for source in _read_config_file(path).get("sources", []):
            if source.endswith((".json", ".jsonl")) and not os.path.isabs(source):
                os.makedirs(os.path.dirname(source) or ".", exist_ok=True)
                open(source, "a").close()
        for cls in (FinetuneConfig, InstructConfig) if "sources" in keys else (TrainConfig, PrepareConfig):
            load_config(cls, [path])
    finally:
        os.chdir(cwd)


@pytest.mark.slow
@pytest.mark.parametrize("rank,says", [("0", True), ("1", False)])
def test_script_config_error_is_said_once_under_torchrun(rank, says):
    import subprocess
    import sys
    env = dict(os.environ, RANK=rank)
    proc = subprocess.run([sys.executable, "plot_log.py", "--out_dirr=x"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert ("did you mean 'out_dir'" in proc.stderr) == says, proc.stderr
    if says:  # one line, as every script's errors
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    else:
        assert proc.stderr == ""


SCRIPT_CLASSES = [("prepare_fineweb", "PrepareConfig"), ("prepare_instruct", "InstructConfig"),
                  ("train", "TrainConfig"), ("finetune", "FinetuneConfig"), ("sample", "SampleConfig"),
                  ("eval_hellaswag", "EvalConfig"), ("export_hf", "ExportConfig"), ("bench", "BenchConfig"),
                  ("plot_log", "PlotConfig"), ("quickstart", "QuickstartConfig")]


@pytest.mark.slow
def test_help_says_each_keys_default_type_and_description():
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "sample.py", "-h"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "usage: python sample.py [config/FILE.py ...] [--key=value ...]"
    line = next(line for line in lines if line.strip().startswith("--temperature="))
    assert line.split() [:2] == ["--temperature=0.8", "(float)"]
    assert line.endswith("0 is greedy; lower is safer, higher more varied")  # the field's comment in sample.py
    assert any(line.split()[:2] == ["--ckpt=''", "(str)"] for line in lines)  # an empty default stays visible
    assert "where and how it runs:" in lines and "sample.py:" in lines  # the groups of keys


@pytest.mark.parametrize("module, name", SCRIPT_CLASSES)
def test_help_describes_every_key(module, name):
    # every key a script owns says what it does; TrainConfig's own fields are described in gptkit/trainer.py
    import importlib
    from gptkit.configurator import _field_docs, help_text
    cls = getattr(importlib.import_module(module), name)
    descriptions, _ = _field_docs(cls)
    text = help_text(cls, f"{module}.py")
    trainer_keys = {f.name for f in dataclasses.fields(TrainConfig)} if issubclass(cls, TrainConfig) else set()
    own = [f.name for f in dataclasses.fields(cls) if f.name not in trainer_keys]
    for key in own:
        assert descriptions.get(key), f"{module}.py: --{key} has no description (a comment on its field)"
        assert f"--{key}=" in text and descriptions[key] in text


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_seed_numpy_cannot_take_is_refused(seed):
    # numpy takes seeds in [0, 2**32) and each rank seeds with seed + rank; outside, the run died in a traceback
    with pytest.raises(ConfigError, match=f"seed={seed}: use a whole number from 0 to 2147483647"):
        load_config(TrainConfig, [f"--seed={seed}"])
    assert load_config(TrainConfig, ["--seed=0"]).seed == 0


def test_config_file_may_import_names_and_keep_helpers(tmp_path):
    path = tmp_path / "helpers.py"
    path.write_text("from math import sqrt\nfrom os.path import join\n_width = 64\nn_embd = int(sqrt(_width ** 2))\n"
                    "n_head = 4\nout_dir = join('out', 'x')\n")
    cfg = load_config(TrainConfig, [str(path)])
    assert cfg.n_embd == 64 and cfg.out_dir == os.path.join("out", "x")


def test_config_file_helper_variable_is_told_to_start_with_underscore(tmp_path):
    path = tmp_path / "helper.py"
    path.write_text("rows = 8\nmicro_batch_size = rows\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'rows' in config file .*helper\.py.*"
                                          r"name it _rows"):
        load_config(TrainConfig, [str(path)])


def test_wrong_type_in_config_file_names_the_file(tmp_path):
    path = tmp_path / "typo.py"
    path.write_text("n_layer = 4,\n")  # a stray comma makes a tuple
    with pytest.raises(ConfigError, match=r"n_layer=\(4,\): expected an int.*in config file .*typo\.py"):
        load_config(TrainConfig, [str(path)])


def test_flag_and_value_as_two_arguments_says_how_to_write_it():
    with pytest.raises(ConfigError, match=r"--max_steps needs a value: --max_steps=VALUE"):
        load_config(TrainConfig, ["--max_steps", "10"])
    # a bool flag alone means True, so the value that follows it was taken for a stray argument
    with pytest.raises(ConfigError, match=r"'False' after --compile: write --compile=False"):
        load_config(TrainConfig, ["--compile", "False"])


def test_other_scripts_keys_read_from_source_equal_their_dataclasses():
    """The configurator reads the recipe scripts' keys from their source (it never imports a script):
    what it reads is exactly the fields of their dataclasses, inherited ones included."""
    import importlib
    from gptkit.configurator import SCRIPT_CONFIGS, BaseConfig, _other_scripts_keys
    classes = [getattr(importlib.import_module(source[:-3].replace("/", ".")), name) for source, name in SCRIPT_CONFIGS]
    stranger = type("StrangerConfig", (BaseConfig,), {})  # a class of none of the scripts: it sees them all
    assert _other_scripts_keys(stranger) == {f.name for cls in classes for f in dataclasses.fields(cls)}
    from gptkit.train_config import DPOConfig  # inherited: total_batch_tokens comes from TrainConfig
    assert "total_batch_tokens" in _other_scripts_keys(stranger) and "rpo_alpha" not in _other_scripts_keys(DPOConfig)
