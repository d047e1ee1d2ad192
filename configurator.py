"""
Overrides for the module-level defaults of train.py / grpo.py (nanoGPT style, with checks):

    python train.py config/debug.py --batch_size=8 --lr=3e-4

A config file is plain Python; each name it defines (not starting with _) must already be a default,
and --key=value must name one too. Values keep the default's type (an int may stand for a float, a
whole float like 2e9 for an int; a default of None takes anything, and only it takes None). Anything else is one
clear error.
"""
import ast
import sys
import traceback


def _coerce(key, value, default):
    if default is None:
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        if isinstance(default, bool) and isinstance(value, bool):
            return value
    elif isinstance(default, float) and isinstance(value, int):
        return float(value)
    elif isinstance(default, int) and isinstance(value, float) and value.is_integer():  # --max_tokens=2e9
        return int(value)
    elif isinstance(value, type(default)):
        return value
    raise SystemExit(f"config error: {key} must be {type(default).__name__} (default {default!r}), got {value!r}")


def configure(defaults, argv=None):
    """Apply config files and --key=value from argv to the dict `defaults` (a module's globals) in place.
    Returns the resolved config: the keys of `defaults` that are plain settings."""
    keys = [k for k, v in defaults.items()
            if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple, list, dict, type(None)))]
    for arg in sys.argv[1:] if argv is None else argv:
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            if not sep:
                raise SystemExit(f"config error: write --{key}=VALUE")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # a bare word is a string
            updates = {key: value}
        else:
            try:
                source = open(arg).read()
            except OSError as e:
                raise SystemExit(f"config error: cannot read config file {arg}: {e.strerror}")
            namespace = {"__file__": arg}  # so a config may exec another beside it: os.path.dirname(__file__)
            try:
                exec(compile(source, arg, "exec"), namespace)
            except Exception as e:  # a typo in a config file: its file and line, not a traceback into this module
                line = e.lineno if isinstance(e, SyntaxError) else \
                    next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__)) if f.filename == arg), "?")
                raise SystemExit(f"config error: {arg}, line {line}: {type(e).__name__}: "
                                 f"{e.msg if isinstance(e, SyntaxError) else e}")
            updates = {k: v for k, v in namespace.items()
                       if not k.startswith("_") and not callable(v) and not hasattr(v, "__file__")}
        for key, value in updates.items():
            if key not in keys:
                raise SystemExit(f"config error: unknown key {key!r} (from {arg}); "
                                 f"known keys: {', '.join(sorted(keys))}")
            defaults[key] = _coerce(key, value, defaults[key])
    return {k: defaults[k] for k in keys}


def check_values(values, choices=None, at_least_one=(), non_negative=()):
    """One clear line for a setting outside its choices ({key: allowed}), a size or count below 1 (0 would divide) or a
    rate below 0 (torch raises deep inside): each checked before any work, not where it would first be used."""
    for key, allowed in (choices or {}).items():
        if values[key] not in allowed:
            names = [repr(a) for a in allowed]
            raise SystemExit(f"config error: {key} must be {', '.join(names[:-1])} or {names[-1]}, not {values[key]!r}")
    for key in at_least_one:
        if values[key] < 1:
            raise SystemExit(f"config error: {key} must be at least 1, not {values[key]}")
    for key in non_negative:
        if values[key] < 0:
            raise SystemExit(f"config error: {key} must not be negative, not {values[key]}")
