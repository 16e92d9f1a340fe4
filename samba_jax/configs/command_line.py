"""One-line errors for `--config=FILE[:variant]` and `--config.a.b=value` before absl parses them.

ml_collections reports a missing experiment file, a bad variant or a misspelt override as a
traceback (some only once the config is first read, deep inside training). The CLIs call
`exit_on_config_flag_error(sys.argv)` first: it loads the experiment as the flag would and
checks every override's path against it, so each mistake is one line naming the flag and the fix,
with exit code 2 (a config error: rerunning the same command would fail the same way). Values
of the wrong type are left to absl, whose message is already one line naming the flag.
"""

from __future__ import annotations

import difflib
import sys
from typing import Sequence

import ml_collections

from samba_jax.configs.base import load_experiment


def _flag_values(argv: Sequence[str], name: str) -> tuple[str | None, list[str]]:
    """(the --name file spec or None, the override paths a.b.c of --name.a.b.c[=v] / --noname.a.b.c)."""
    spec, overrides = None, []
    args = list(argv[1:])
    for i, arg in enumerate(args):
        if arg == "--":
            break
        flag = arg.lstrip("-") if arg.startswith("--") or arg.startswith("-") else None
        if flag is None:
            continue
        key, has_value, value = flag.partition("=")
        if key == name:
            spec = value if has_value else (args[i + 1] if i + 1 < len(args) else "")
        elif key.startswith(name + "."):
            overrides.append(key[len(name) + 1:])
        elif key.startswith("no" + name + "."):
            overrides.append(key[len(name) + 3:])
    return spec, overrides


def _missing_field(config: ml_collections.ConfigDict, path: str, flag: str) -> str | None:
    """Why `path` (a.b.c) names no field of `config`, with the closest names; None if it does."""
    node, walked = config, []
    for part in path.split("."):
        fields = list(node.keys()) if isinstance(node, (ml_collections.ConfigDict, dict)) else None
        if fields is None:
            return (f"--{flag}.{path}: {flag}.{'.'.join(walked)} is a value, not a group of fields. "
                    f"Fix: override --{flag}.{'.'.join(walked)}=... itself.")
        if part not in fields:
            where = f"{flag}.{'.'.join(walked)}" if walked else flag
            close = difflib.get_close_matches(part, fields, n=3, cutoff=0.5)
            hint = (f"did you mean {' or '.join('--' + '.'.join([flag] + walked + [c]) for c in close)}?" if close
                    else f"its fields are {', '.join(sorted(fields))}.")
            return f"--{flag}.{path}: {where} has no field {part!r}; {hint}"
        node, walked = node[part], walked + [part]
    return None


def config_flag_error(argv: Sequence[str], flag: str = "config") -> str | None:
    """The first problem with the --config flag and its overrides in argv, as one line; None if none.

    An absent --config is left to absl (a required flag names itself)."""
    spec, overrides = _flag_values(argv, flag)
    if spec is None:
        return None
    if not spec:
        return f"--{flag} is empty. Fix: pass an experiment file, e.g. --{flag}=experiments/tiny.py."
    try:
        config = load_experiment(spec)
    except FileNotFoundError:
        return (f"--{flag}={spec}: the file {spec.partition(':')[0]!r} does not exist. Fix: pass one of "
                f"experiments/*.py (relative to the current directory, or an absolute path).")
    except (ValueError, TypeError, KeyError) as e:  # a bad variant after the colon
        message = str(e.args[0]) if e.args else str(e)
        return f"--{flag}={spec}: {message}"
    for path in overrides:
        error = _missing_field(config, path, flag)
        if error:
            return error
    return None


def exit_on_config_flag_error(argv: Sequence[str], flag: str = "config") -> None:
    """Prints `config_flag_error`'s line and exits 2 if there is one."""
    error = config_flag_error(argv, flag)
    if error:
        print(f"ERROR (ConfigError): {error}", file=sys.stderr, flush=True)
        sys.exit(2)
