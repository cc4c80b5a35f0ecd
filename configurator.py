"""
Config overrides shared by every stage script, with nanoGPT's semantics.

A stage script lists its defaults as plain module-level variables, then calls

    config = configure(globals())

which applies, in order, each positional argument (a Python file executed in
the script's globals, e.g. config/quickstart.py) and each --key=value argument
(the value parsed with ast.literal_eval, falling back to the raw string).
So `python train.py config/quickstart.py --learning_rate=3e-4 --compile=False`
starts from train.py's defaults, applies the config file, then the two flags.

A config key is any module-level name that does not start with an underscore
and holds a bool, int, float, str, tuple, list, dict or None. Mistakes stop the
run with one line naming the problem and the fix: an unknown key (with the
closest valid names), a wrong type (an int where a float is expected is
accepted), a missing config file. The returned dict is the final config, which
the script prints and stores in its checkpoints.
"""

import ast
import difflib
import os
import sys

CONFIG_TYPES = (bool, int, float, str, tuple, list, dict, type(None))


def config_keys(namespace):
    return [k for k, v in namespace.items() if not k.startswith("_") and isinstance(v, CONFIG_TYPES)]


def _unknown_key_error(key, known, where):
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join('--' + c for c in close)}?" if close else "run with --help to list the valid keys"
    return SystemExit(f"config error: unknown key '{key}' {where}; {hint}")


def _checked(key, value, default, where):
    """Return value converted to the type of default, or stop with a one-line error."""
    if default is None or value is None:
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)):
        return type(default)(value)
    if type(value) is not type(default):
        raise SystemExit(
            f"config error: {key}={value!r} {where} is a {type(value).__name__}, "
            f"but {key} expects a {type(default).__name__} (default {default!r})"
        )
    return value


def _print_help(namespace, keys):
    doc = (namespace.get("__doc__") or "").strip()
    if doc:
        print(doc, end="\n\n")
    print("config keys (defaults):")
    for k in keys:
        print(f"  --{k}={namespace[k]!r}")


def configure(namespace, argv=None):
    """Apply config files and --key=value overrides to namespace; return the final config dict."""
    argv = sys.argv[1:] if argv is None else argv
    keys = config_keys(namespace)
    defaults = {k: namespace[k] for k in keys}
    if "-h" in argv or "--help" in argv:
        _print_help(namespace, keys)
        raise SystemExit(0)
    for arg in argv:
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                raise SystemExit(f"config error: config file '{arg}' not found; check the path (configs live in config/)")
            before = dict(namespace)
            with open(arg) as f:
                code = compile(f.read(), arg, "exec")
            exec(code, namespace)
            for k, v in list(namespace.items()):
                if k.startswith("_") or (k in before and before[k] is v) or not isinstance(v, CONFIG_TYPES):
                    continue
                if k not in defaults:
                    raise _unknown_key_error(k, keys, f"in {arg}")
                namespace[k] = _checked(k, v, defaults[k], f"in {arg}")
        else:
            key, sep, raw = arg[2:].partition("=")
            if not sep:
                raise SystemExit(f"config error: '{arg}' has no value; write --{key}=VALUE")
            if key not in defaults:
                raise _unknown_key_error(key, keys, "on the command line")
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw
            # A string default takes the raw text, so --out_dir=123 stays the string '123'.
            if isinstance(defaults[key], str) and not isinstance(value, str):
                value = raw
            namespace[key] = _checked(key, value, defaults[key], "on the command line")
    return {k: namespace[k] for k in keys}


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
