"""One config mechanism for every script, nanoGPT style.

A script keeps its defaults as lowercase module constants. `get_config(defaults, argv)` returns them as one
object (`cfg.lr`) after `override(defaults, argv)` has applied, in order:
config files (`config/name.py`, plain Python assigning the same names, optionally starting from another
file with `include("base.py")`) and `--key=value` or `--key value`
arguments. Values are parsed as Python literals (falling back to a plain string) and must keep the type of
the default (an int is accepted where a float is expected); a float must be finite. Any mistake ends the run
with one line that names the problem and the fix.

A config file is Python and runs as such: run only config files you trust.
"""
import ast
import math
import os
import traceback
import types


def _parse(key, text, default):
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # bare words are strings: --model Qwen2.5-VL-3B
    return _check(key, value, default)


def _check(key, value, default):
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(default, tuple) and isinstance(value, list):
        value = tuple(value)
    if default is not None and type(value) is not type(default):
        raise SystemExit(f"config error: {key} must be {type(default).__name__} (default {default!r}), "
                         f"got {type(value).__name__} {value!r}; fix the value")
    if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, tuple) else [value])):
        raise SystemExit(f"config error: {key} must be finite, got {value!r}")  # 1e999 parses as inf
    return value


def _read_config_file(path):
    """Run a config file and return the names it assigns. `include("other.py")` inside it first assigns
    everything the other file (same folder) assigns, so a variant states only what it changes."""
    values = {}

    def include(name):
        other = os.path.join(os.path.dirname(path), name)
        if not os.path.isfile(other):
            raise SystemExit(f"config error: {path} includes '{name}', which is not in {os.path.dirname(path) or '.'}")
        values.update(_read_config_file(other))
    try:
        code = compile(open(path).read(), path, "exec")
    except SyntaxError as e:
        raise SystemExit(f"config error: {path}:{e.lineno}: {e.msg}; fix the file") from None
    try:
        exec(code, {"include": include}, values)
    except SystemExit:
        raise
    except Exception as e:  # e.g. a NameError: point at the file's own line, not at "<string>"
        lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == path]
        raise SystemExit(f"config error: {path}:{lines[-1] if lines else '?'}: {type(e).__name__}: {e}") from None
    return values


def _line_of(path, key):
    """The line of the config file that assigns `key` (for error messages), or '?'."""
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == key for t in targets):
                return node.lineno
    return "?"


def check_at_least(cfg, bounds):
    """Stop with one line at the first value below its lower bound; bounds: {name: lowest allowed value}."""
    for key, low in bounds.items():
        if not getattr(cfg, key) >= low:  # also catches nan
            raise SystemExit(f"config error: {key} must be >= {low}, got {getattr(cfg, key)}")


def get_config(defaults, argv):
    """The config object every script uses: cfg.n_clean rather than cfg["n_clean"]."""
    return types.SimpleNamespace(**override(defaults, argv))


def override(defaults, argv):
    """defaults: dict of name -> value; argv: list of strings. Returns a new dict."""
    config = dict(defaults)
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):  # a config file
            if not os.path.isfile(arg):
                raise SystemExit(f"config error: config file '{arg}' not found; pass an existing path like config/demo.py")
            values = _read_config_file(arg)
            for key, value in values.items():
                if key.startswith("_") or callable(value) or type(value).__name__ == "module":
                    continue
                if key not in config:
                    raise SystemExit(f"config error: {arg}:{_line_of(arg, key)}: unknown constant '{key}'; "
                                     f"known: {', '.join(sorted(defaults))}")
                config[key] = _check(key, value, defaults[key])
            i += 1
            continue
        key, has_value, text = arg[2:].partition("=")
        if not has_value:  # --key value
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise SystemExit(f"config error: {arg} needs a value; write {arg}=VALUE")
            text, i = argv[i + 1], i + 1
        if key not in config:
            raise SystemExit(f"config error: unknown constant '{key}'; known: {', '.join(sorted(defaults))}")
        config[key] = _parse(key, text, defaults[key])
        i += 1
    return config
