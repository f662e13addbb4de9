"""
One configuration grammar for every script:

    python SCRIPT.py [config/FILE.py ...] [--key=value ...]

Defaults are the fields of a dataclass. Config files are plain Python assignments, each run in a
namespace of its own; later files and flags override earlier ones. A config file may also hold
keys for the other gptkit scripts (one recipe file serves prepare, train and finetune), but a key
no script knows is an error, and so is any unknown --flag. Values are checked against the field's
type: ints are accepted for floats, a whole float such as 1e3 for an int, and
True/False/true/false (or 1/0) for bools. A config file may import and define helpers:
modules, functions and _underscored names are not settings.

    cfg = configure(TrainConfig)          # in a script: errors print and exit with status 2
    cfg = load_config(TrainConfig, args)  # in tests: errors raise ConfigError
"""

import ast
import dataclasses
import difflib
import inspect
import io
import json
import math
import os
import sys
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass

# The settings dataclasses whose keys a shared recipe file may hold, by the file that defines them.
# Their field names are read from the source (ast), never imported: the configurator sits below every
# script, and importing a script to learn its keys would run it and invert the layers.
SCRIPT_CONFIGS = [
    ("prepare_fineweb.py", "PrepareConfig"),
    ("prepare_instruct.py", "InstructConfig"),
    ("gptkit/train_config.py", "TrainConfig"),
    ("gptkit/train_config.py", "FinetuneConfig"),
    ("gptkit/train_config.py", "DPOConfig"),
    ("gptkit/train_config.py", "RLConfig"),
    ("prepare_toy_task.py", "ToyTaskConfig"),
    ("sample.py", "SampleConfig"),
    ("eval_hellaswag.py", "EvalConfig"),
    ("export_hf.py", "ExportConfig"),
    ("bench.py", "BenchConfig"),
    ("train_tokenizer.py", "TokenizerConfig"),
]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class UserError(Exception):
    """Base of every error a user can fix (a setting, a file, a checkpoint): its message says what to
    do, and scripts print it as one `error:` line (gptkit.system.run_main), not a traceback."""


class ConfigError(UserError, ValueError):
    """A user's configuration mistake; the message says what to change."""

    @classmethod
    def of(cls, problems):
        """One error for validate()'s problems: a single one as it is (one line), several as a list."""
        problems = list(dict.fromkeys(problems))  # a missing folder named by two checks is one problem
        if len(problems) == 1:
            return cls(problems[0])
        return cls(f"{len(problems)} problems with the configuration:\n  - " + "\n  - ".join(problems))


@dataclass
class BaseConfig:
    # where and how it runs
    device: str = "auto"   # auto picks cuda > mps > cpu; or cpu, cuda, cuda:N, mps
    dtype: str = "auto"    # auto: bfloat16 on GPUs that have it, float16 on older GPUs (with a grad scaler) and MPS, float32 on CPU (sample.py, serve.py: bfloat16 on CPUs with bf16 instructions)
    seed: int = 1337       # random seed (0 to 2**31-1): the same seed and settings give the same run
    compile: bool = False  # torch.compile: faster steps on GPU after a minute of compiling

    def validate(self):
        """Cross-field checks; return a list of problems (empty when all is well)."""
        problems = []
        if self.device not in ("auto", "cpu", "mps") and not self.device.startswith("cuda"):
            problems.append(f"device={self.device!r}: use auto, cpu, cuda, cuda:N or mps")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            problems.append(f"dtype={self.dtype!r}: use auto, float32, bfloat16 or float16")
        if not 0 <= self.seed < 2**31:  # numpy takes [0, 2**32) and each rank seeds with seed + rank
            problems.append(f"seed={self.seed}: use a whole number from 0 to {2**31 - 1}")
        return problems


def _type_name(tp):
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key, value, tp):
    """Convert value (a string from the command line, or a Python value from a config file) to tp."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value in ("None", "none", "")):
            if type(None) in args:
                return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"{key}={value!r}: expected {_type_name(tp)}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = value.strip()
            if value.startswith("["):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    raise ConfigError(f"{key}={value!r}: expected a list such as [\"a\", \"b\"] or a,b")
            else:
                value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(key, v, item_tp) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value in ("True", "true", "1", "False", "false", "0"):
            return value in ("True", "true", "1")
        raise ConfigError(f"{key}={value!r}: expected a bool (True/False/true/false/1/0)")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected an int")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                try:
                    value = float(value)
                except ValueError:
                    raise ConfigError(f"{key}={value!r}: expected an int")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}={value!r}: expected an int (a whole number such as 1000 or 1e3)")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected a float")
        number = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}={value!r}: expected a float")
        if not math.isfinite(number):  # no setting means anything with nan or inf; they only crash later
            raise ConfigError(f"{key}={value!r}: expected a finite number")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}={value!r}: expected a string")
    raise AssertionError(f"configurator does not handle the type {tp} of {key}")


def _read_config_file(path):
    """Run a config file in its own namespace and return its assignments."""
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 (byte {e.start}): save it as UTF-8")
    try:
        code = compile(source, path, "exec")
    except SyntaxError as e:
        raise ConfigError(f"syntax error in config file {path}, line {e.lineno}: {e.msg}")
    namespace = {}
    try:
        exec(code, namespace)
    except Exception as e:
        tb = e.__traceback__
        line = None
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == path:
                line = tb.tb_lineno
            tb = tb.tb_next
        raise ConfigError(f"error in config file {path}, line {line}: {type(e).__name__}: {e}")
    # Settings are the plain values: not the modules, functions and classes a file imports or defines
    # (no setting is callable), nor _helper names.
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and not isinstance(v, types.ModuleType) and not callable(v)}


def _declared_classes(path):
    """{class name: (base names, field names)} of the classes a source file defines (dataclass fields:
    annotated class attributes that are not ClassVar)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    classes = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            fields = [item.target.id for item in node.body if isinstance(item, ast.AnnAssign)
                      and isinstance(item.target, ast.Name) and "ClassVar" not in ast.unparse(item.annotation)]
            classes[node.name] = ([ast.unparse(base) for base in node.bases], fields)
    return classes


def _other_scripts_keys(own_cls):
    """The keys of every class of SCRIPT_CONFIGS, with the fields they inherit."""
    declared = {"BaseConfig": ([], [f.name for f in dataclasses.fields(BaseConfig)])}
    for path in dict.fromkeys(path for path, _ in SCRIPT_CONFIGS):
        if os.path.exists(os.path.join(ROOT, path)):  # a script missing from this checkout has no keys
            declared.update(_declared_classes(os.path.join(ROOT, path)))

    def fields_of(name):
        bases, fields = declared.get(name, ([], []))
        return {key for base in bases for key in fields_of(base)} | set(fields)

    keys = set()
    for _, class_name in SCRIPT_CONFIGS:
        if class_name != own_cls.__name__:
            keys |= fields_of(class_name)
    return keys


def _unknown_key_error(key, known, where):
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    if where.startswith("config file"):
        hint += f" (a helper variable of the file is not a setting: name it _{key})"
    return ConfigError(f"unknown config key '{key}' in {where}{hint}")


def load_config(cls, args):
    """Build cls from its defaults, then each config file and --key=value flag in args, in order."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {}
    other_keys = None
    bare_flag = None  # the last --flag given without '=', to explain a value that follows it
    for arg in args:
        if arg.startswith("--"):
            key, sep, raw = arg[2:].partition("=")
            key = key.replace("-", "_")
            if not sep:
                if key in fields and hints[key] is bool:
                    raw = "True"  # a bare --flag switches a bool on
                    bare_flag = key
                else:
                    raise ConfigError(f"flag {arg} needs a value: --{key}=VALUE")
            if key not in fields:
                raise _unknown_key_error(key, fields, "the command line")
            values[key] = _coerce(key, raw, hints[key])
            if sep:
                bare_flag = None
        elif arg.endswith(".py"):
            bare_flag = None
            for key, value in _read_config_file(arg).items():
                if key in fields:
                    try:
                        values[key] = _coerce(key, value, hints[key])
                    except ConfigError as e:
                        raise ConfigError(f"{e} (in config file {arg})")
                    continue
                if other_keys is None:
                    other_keys = _other_scripts_keys(cls)
                if key not in other_keys:
                    raise _unknown_key_error(key, fields | other_keys, f"config file {arg}")
        elif bare_flag:
            raise ConfigError(f"cannot understand argument {arg!r} after --{bare_flag}: write --{bare_flag}={arg}")
        else:
            raise ConfigError(f"cannot understand argument {arg!r}: give config files (config/NAME.py) "
                              f"and flags (--key=value)")
    cfg = cls(**values)
    cfg.given = frozenset(values)  # the keys a file or flag set (not a field: never saved or printed)
    problems = cfg.validate()
    if problems:
        raise ConfigError.of(problems)
    return cfg


def _field_docs(cls):
    """-> ({field: its trailing comment}, {field: the comment line heading its group}), read from the
    source of cls and its bases, so that --help says what the dataclass comments say."""
    descriptions, sections = {}, {}
    for klass in reversed(cls.__mro__):  # a subclass's comment on a field it overrides wins
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue  # defined where no source is (an interactive session)
        # fields before any heading comment are headed by the file that defines them (sample.py:)
        section, line_field = os.path.basename(inspect.getsourcefile(klass)), {}
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            row, col = tok.start
            if tok.type == tokenize.NAME and col == 4 and row not in line_field and tok.string != "def":
                line_field[row] = tok.string  # a field's name starts its line in the class body
                if tok.string not in sections:
                    sections[tok.string] = section
            elif tok.type == tokenize.NAME and col == 4 and tok.string == "def":
                break  # methods follow the fields
            elif tok.type == tokenize.COMMENT:
                text = tok.string.lstrip("#").strip()
                if row in line_field:
                    descriptions[line_field[row]] = text
                elif col == 4:
                    section = text
    return descriptions, sections


def _default_text(value):
    if isinstance(value, str):
        return value if value and value == value.strip() else repr(value)  # '' and ' x ' show their quotes
    return repr(value)


def help_text(cls, script):
    """The --help of a script: usage, then each key with its default, type and description."""
    hints = typing.get_type_hints(cls)
    descriptions, sections = _field_docs(cls)
    lines = [f"usage: python {script} [config/FILE.py ...] [--key=value ...]",
             "",
             "Config files (plain Python assignments) and --key=value flags apply left to right: a later one",
             "overrides an earlier one. Bools take True/False/true/false/1/0; ints take 1e3 or 1_000.",
             ""]
    entries = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        entries.append((f.name, f"--{f.name}={_default_text(default)}", _type_name(hints[f.name])))
    width = min(max(len(flag) for _, flag, _ in entries), 40)
    section = None
    for name, flag, type_name in entries:
        if sections.get(name) and sections[name] != section:
            section = sections[name]
            lines.append(f"{section}:")
        if len(flag) > width:  # a long default: its description goes on the next line
            lines.append(f"  {flag}")
            flag = ""
        lines.append(f"  {flag:<{width}}  ({type_name}) {descriptions.get(name, '')}".rstrip())
    if getattr(cls, "help_epilog", ""):  # a ClassVar of the config: what the keys do not say (exit statuses)
        lines += ["", textwrap.fill(cls.help_epilog, 100)]
    return "\n".join(lines)


def configure(cls, args=None):
    """For scripts: parse sys.argv; on a mistake print it and exit with status 2, no traceback."""
    args = sys.argv[1:] if args is None else args
    if any(a in ("-h", "--help") for a in args):
        print(help_text(cls, os.path.basename(sys.argv[0])))
        sys.exit(0)
    try:
        return load_config(cls, args)
    except ConfigError as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike: say it once
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def config_dict(cfg):
    return dataclasses.asdict(cfg)


def print_config(cfg):
    print(f"{type(cfg).__name__}:")
    for key, value in config_dict(cfg).items():
        print(f"  {key} = {value!r}")
