"""
Rewards for rl.py: plain Python functions `(prompt, completion, row) -> float`, where prompt is the
user's text, completion the model's answer (the text a client would see) and row the whole record
the prompt came from (GSM8K's {"question", "answer"}, or your JSONL's fields). rl.py sums the
functions named by --reward; a held-out prompt passes when its greedy answer's sum reaches
--pass_reward (1.0: a correct answer).

    --reward=gsm8k                        the final number equals the one after "####" in row["answer"]
    --reward=exact_match                  the answer, stripped, equals row["answer"], stripped
    --reward=gsm8k,answer_format          correctness plus a format term (0.1 for ending on "#### N")
    --reward=my_rewards:brevity           your own: module:function (importable), or path/to/file.py:function

A reward must return a number; one that raises or returns anything else stops the run with one
`error:` line naming the prompt (check_reward).
"""

import importlib
import importlib.util
import math
import numbers
import os
import re

from gptkit.configurator import ConfigError, UserError

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text):
    """The answer a text ends on: the number after its last "####" (GSM8K's marker), else its last
    number; commas and a trailing ".0" dropped -> a string, or None when there is no number."""
    text = str(text)
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    found = NUMBER.findall(tail)
    if not found:
        return None
    value = found[0] if "####" in text else found[-1]
    value = value.replace(",", "")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return "0" if value in ("-0", "") else value


def gsm8k(prompt, completion, row):
    """1.0 when the completion's final number is the reference's (row["answer"], "... #### 72")."""
    expected = final_number(row.get("answer", ""))
    return float(expected is not None and final_number(completion) == expected)


def exact_match(prompt, completion, row):
    """1.0 when the completion is row["answer"] (both stripped of surrounding white space)."""
    return float(completion.strip() == str(row.get("answer", "")).strip())


def answer_format(prompt, completion, row):
    """0.1 when the completion ends on a line "#### NUMBER" (GSM8K's answer format): a small nudge
    toward an answer the checker can read, worth less than being right."""
    return 0.1 * bool(re.search(r"####\s*-?\d[\d,]*(?:\.\d+)?\s*$", completion))


BUILTIN = {"gsm8k": gsm8k, "exact_match": exact_match, "answer_format": answer_format}


def load_reward(spec):
    """A built-in name or "module:function" / "path/to/file.py:function" -> the function."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    module_name, colon, function = spec.rpartition(":")
    if not colon or not module_name or not function:
        raise ConfigError(f"reward={spec!r}: use a built-in ({', '.join(BUILTIN)}) or module:function, "
                          "as in --reward=my_rewards:brevity")
    try:
        if module_name.endswith(".py"):
            if not os.path.exists(module_name):
                raise ConfigError(f"reward={spec!r}: no file {module_name}")
            loader = importlib.util.spec_from_file_location(os.path.basename(module_name)[:-3], module_name)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except Exception as e:  # the user's module failed to import: say which and why
        raise ConfigError(f"reward={spec!r}: importing {module_name} failed ({type(e).__name__}: {e})") from e
    fn = getattr(module, function, None)
    if not callable(fn):
        raise ConfigError(f"reward={spec!r}: {module_name} has no function {function}")
    return fn


class RewardError(UserError, RuntimeError):
    """A reward function raised or returned a non-number; the message names it and the prompt."""


def check_reward(name, fn, prompt, completion, row):
    """fn's reward of one completion as a float, or RewardError saying what went wrong and where."""
    where = f"reward {name} on the prompt {prompt[:80]!r}{'...' if len(prompt) > 80 else ''}"
    try:
        value = fn(prompt, completion, row)
    except Exception as e:
        raise RewardError(f"{where} raised {type(e).__name__}: {e}") from e
    if not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise RewardError(f"{where} returned {value!r}: a reward must be a finite number (float, int or bool)")
    return float(value)
