"""The README's commands name real scripts, recipes and options; its file tree matches the checkout.
(The commands themselves run in the other tests: quick start, prepare, train, finetune, sample, ...)"""
import importlib
import os
import re
import shlex

import pytest

from conftest import ROOT
from gptkit.configurator import ConfigError, load_config

README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def readme_commands():
    """Every `python X.py ...` and `torchrun ... X.py ...` line of the README's bash blocks."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():  # a line ending in \ goes on in the next
            words = shlex.split(line, comments=True)
            if words and words[0] in ("python", "torchrun") and words[1] != "-m":
                script = next(w for w in words if w.endswith(".py") and not w.startswith("-"))
                args = words[words.index(script) + 1:]
                commands.append((script, args))
    return commands


def config_class(script):
    """The dataclass a script hands to configure()."""
    source = open(os.path.join(ROOT, script), encoding="utf-8").read()
    name = re.search(r"configure\((\w+)\)", source).group(1)
    return getattr(importlib.import_module(script[:-3]), name)


COMMANDS = readme_commands()


def test_readme_has_the_commands_users_need():
    scripts = {script for script, _ in COMMANDS}
    assert {"quickstart.py", "prepare_fineweb.py", "train.py", "prepare_instruct.py", "finetune.py", "sample.py",
            "eval_hellaswag.py", "export_hf.py", "bench.py", "plot_log.py"} <= scripts
    assert sum(1 for line in README.splitlines() if line.startswith("torchrun")) >= 2


@pytest.mark.parametrize("script,args", COMMANDS, ids=[" ".join([s] + a)[:80] for s, a in COMMANDS])
def test_readme_command_is_valid(script, args):
    assert os.path.exists(os.path.join(ROOT, script)), f"{script} does not exist"
    for arg in args:
        if arg.endswith(".py") and not arg.startswith("-"):
            assert os.path.exists(os.path.join(ROOT, arg)), f"{arg} does not exist"
    cls = config_class(script)
    # Keys and value types only: paths such as path/to/gpt2 are placeholders, and checkpoints that an
    # earlier README command writes do not exist here, so the cross-field checks are skipped.
    unchecked = type(cls.__name__, (cls,), {"validate": lambda self: []})
    cwd = os.getcwd()
    os.chdir(ROOT)  # config files are named relative to the repository root, as in the README
    try:
        load_config(unchecked, args)
    except ConfigError as e:
        pytest.fail(f"README: python {script} {' '.join(args)}: {e}")
    finally:
        os.chdir(cwd)


def test_file_tree_matches_the_checkout():
    tree = README[README.index("## Files"):]
    tree = tree[tree.index("```") + 3:]
    tree = tree[:tree.index("```")]
    listed = set(re.findall(r"^\s*([\w./]+\.(?:py|md))\b", tree, flags=re.M))
    listed = {name if "/" in name or not name.endswith(".py") or os.path.exists(os.path.join(ROOT, name))
              else "gptkit/" + name for name in listed}
    for name in listed:
        assert os.path.exists(os.path.join(ROOT, name)), f"README lists {name}, which does not exist"
    scripts = {n for n in os.listdir(ROOT) if n.endswith(".py")}
    modules = {"gptkit/" + n for n in os.listdir(os.path.join(ROOT, "gptkit")) if n.endswith(".py") and n != "__init__.py"}
    assert scripts | modules <= listed, f"missing from the README's file tree: {sorted((scripts | modules) - listed)}"
    recipes = {n[:-3] for n in os.listdir(os.path.join(ROOT, "config")) if n.endswith(".py")}
    assert all(r in tree for r in recipes), "every recipe in config/ is named in the file tree"
