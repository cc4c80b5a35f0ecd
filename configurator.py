"""
Config overrides shared by every stage script, with nanoGPT's semantics.

A stage script lists its defaults as module-level variables, then calls config = configure(globals()), which
applies each positional argument (a Python file run in the script's globals, e.g. config/quickstart.py), then
each --key=value (parsed with ast.literal_eval, else the raw string): so `python train.py config/quickstart.py
--learning_rate=3e-4` is train.py's defaults, the file, the flag. A config key is a module-level name without
a leading underscore holding a bool, int, float, str, tuple, list, dict or None. An unknown key, a wrong type,
a value out of range (VALID_RANGES, one table for every script) or a bad config file stops the run with one
line, before any work. The returned dict is the final config, printed and stored in checkpoints.
"""

import ast
import contextlib
import difflib
import math
import os
import re
import sys
import traceback

CONFIG_TYPES = (bool, int, float, str, tuple, list, dict, type(None))


def _at_least(low):
    return f"an integer >= {low}", lambda v: v >= low


def _one_of(*choices):
    return f"one of {', '.join(choices)}", lambda v: v in choices


def _finite(low, high=None, low_open=False):
    bounds = (f"> {low}" if low_open else f">= {low}") + (f" and < {high:g}" if high is not None else "")
    return (f"a finite number {bounds}",
            lambda v: math.isfinite(v) and (v > low if low_open else v >= low) and (high is None or v < high))


# The valid values of every key that more than one script has or that a mistake makes silently
# wrong (plan.py's too): configure() checks each key of this table that a script has. A key whose default in
# that script is 0 may also be 0, where it means "derive it" (sft.py's max_iters: from epochs).
VALID_RANGES = {
    **{k: _at_least(1) for k in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "total_batch_tokens",
                                  "total_batch_size", "eval_iters", "eval_interval", "log_interval", "max_iters",
                                  "keep_checkpoints", "epochs", "benchmark_limit", "pipeline_stages", "num_gpus",
                                  "download_workers", "max_document_chars", "shard_tokens", "minhash_bands",
                                  "minhash_rows")},
    **{k: _at_least(0) for k in ("n_kv_head", "ffn_hidden", "warmup_iters", "lr_decay_iters", "lora_rank",
                                  "max_documents", "max_tokens", "num_workers", "bleu_sentences")},
    "bpe_vocab_size": _at_least(258),  # the 256 bytes, end-of-text and at least one merge
    **{k: _finite(0, 1) for k in ("dropout", "lora_dropout", "val_fraction", "beta1", "beta2")},
    **{k: _finite(0, low_open=True) for k in ("beta", "rope_theta", "norm_eps", "lora_alpha", "pcie_gb_per_s")},
    **{k: _finite(0) for k in ("weight_decay", "grad_clip", "peak_flops", "max_seconds", "eval_seconds",
                                "logit_softcap", "flops", "hours", "gpu_memory_gb")},
    "muon_momentum": _finite(0, 1),
    **{k: ("a number in (0, 1]", lambda v: 0 < v <= 1) for k in ("lr_decay_fraction", "near_threshold", "mfu")},
    # A rate of 1e9 is a typo, and one beyond float32's range (~3e38) stops AdamW with a traceback.
    **{k: _finite(0, 1e9, low_open=True) for k in ("learning_rate", "muon_lr")},
    "min_lr": _finite(0, 1e9),
    "label_smoothing": _finite(0, 0.5),
    # torch takes seeds below 2**64 and rl.py shifts its seed up by 32 bits: past that, a traceback mid-run
    "seed": ("an integer from 0 to 2**32 - 1", lambda v: 0 <= v < 2**32),
    "device": ("auto, cpu, cuda, cuda:N or mps", lambda v: re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v) is not None),
    "parallelism": _one_of("ddp", "fsdp"),
    "pipeline_schedule": _one_of("gpipe", "1f1b"),
    "optimizer": _one_of("adamw", "muon"),
    "lr_schedule": _one_of("cosine", "wsd"),
    "lr_decay_shape": _one_of("linear", "1-sqrt"),
    "resume": _one_of("no", "yes", "auto"),
    "law": _one_of("chinchilla", "kaplan", "both"),
    "tokenizer": _one_of("gpt2", "bpe", "char", "byte"),
}


def _run_config_file(path, namespace):
    """exec the config file at path in namespace; a file that is not UTF-8, does not parse or raises
    stops with one line naming the file and the line."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        source = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise SystemExit(f"config error: {path} line {line} is not UTF-8 text "
                         f"(byte 0x{raw[e.start]:02x}); save the file as UTF-8") from None
    try:
        code = compile(source, path, "exec")
    except (SyntaxError, ValueError) as e:  # ValueError: a NUL byte, before Python 3.12
        where = f" line {e.lineno}" if getattr(e, "lineno", None) else ""
        raise SystemExit(f"config error: {path}{where} is not valid Python ({getattr(e, 'msg', e)}); fix the file") \
            from None
    try:
        exec(code, namespace)
    except Exception as e:
        line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__)) if f.filename == path), "?")
        raise SystemExit(f"config error: {path} line {line} raised {type(e).__name__}: {e}; fix the file") from None


def _set(namespace, defaults, key, value, where):
    """namespace[key] = value converted to the type of key's default; an unknown key or a wrong type stops
    with one line."""
    if key not in defaults:
        close = difflib.get_close_matches(key, defaults, n=3, cutoff=0.5)
        hint = (f"did you mean {', '.join('--' + c for c in close)}?" if close
                else "run with --help to list the valid keys")
        raise SystemExit(f"config error: unknown key '{key}' {where}; {hint}")
    default = defaults[key]
    if default is not None and value is not None:
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)):
            value = type(default)(value)
        elif type(value) is not type(default):
            raise SystemExit(f"config error: {key}={value!r} {where} is a {type(value).__name__}, "
                             f"but {key} expects a {type(default).__name__} (default {default!r})")
    namespace[key] = value


class _DefaultsRead(Exception):
    """How configure() ends the import of a script under defaults_only."""


_defaults_only = None


@contextlib.contextmanager
def defaults_only():
    """`with defaults_only() as defaults: import train` runs a stage script only up to its configure(globals())
    call, which puts the script's config defaults into defaults and ends the import (plan.py reads train.py's so)."""
    global _defaults_only
    _defaults_only = {}
    try:
        with contextlib.suppress(_DefaultsRead):
            yield _defaults_only
    finally:
        _defaults_only = None


def configure(namespace, argv=None):
    """Apply config files and --key=value overrides to namespace; return the final config dict."""
    argv = sys.argv[1:] if argv is None else argv
    keys = [k for k, v in namespace.items() if not k.startswith("_") and isinstance(v, CONFIG_TYPES)]
    defaults = {k: namespace[k] for k in keys}
    if _defaults_only is not None:
        _defaults_only.update(defaults)
        raise _DefaultsRead
    if "-h" in argv or "--help" in argv:
        doc = (namespace.get("__doc__") or "").strip()
        print((f"{doc}\n\n" if doc else "") + "config keys (defaults):")
        for k in keys:
            print(f"  --{k}={namespace[k]!r}")
        raise SystemExit(0)
    for arg in argv:
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                raise SystemExit(f"config error: config file '{arg}' not found; check the path (configs live in config/)")
            before = dict(namespace)
            _run_config_file(arg, namespace)
            for k, v in list(namespace.items()):
                if not (k.startswith("_") or (k in before and before[k] is v) or not isinstance(v, CONFIG_TYPES)):
                    _set(namespace, defaults, k, v, f"in {arg}")
        else:
            key, sep, raw = arg[2:].partition("=")
            if not sep:
                raise SystemExit(f"config error: '{arg}' has no value; write --{key}=VALUE")
            value = raw
            if key in defaults:  # else _set says so, before the value is read
                try:
                    value = ast.literal_eval(raw)
                except (ValueError, SyntaxError):
                    pass
                # A string default takes the raw text, so --out_dir=123 stays the string '123'.
                if isinstance(defaults[key], str) and not isinstance(value, str):
                    value = raw
            _set(namespace, defaults, key, value, "on the command line")
    config = {k: namespace[k] for k in keys}
    # the first value outside its VALID_RANGES stops the run
    for key, (valid, is_valid) in VALID_RANGES.items():
        if key not in config or defaults[key] is None or config[key] is None or config[key] == 0 == defaults[key]:
            continue  # not this script's key, or None, or 0 where 0 is the default ("derive it")
        try:
            if not is_valid(config[key]):
                raise SystemExit(f"config error: {key}={config[key]!r} is invalid; {key} must be {valid}")
        except TypeError:  # a script where the key is of another kind (a name, not a number) checks it itself
            pass
    return config


def print_config(config):
    """The final config as key=value pairs, wrapped to the terminal's usual width; under torchrun
    only rank 0 prints (the process group does not exist yet, so torchrun's RANK tells)."""
    if int(os.environ.get("RANK", 0)) != 0:
        return
    line = "config:"
    for k, v in config.items():
        item = f" {k}={v!r}"
        if len(line) + len(item) > 100:
            print(line)
            line = "       "
        line += item
    print(line)
