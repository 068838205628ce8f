"""`--config selchat.toml`: every command-line option, as a TOML key of the same name.

The keys are not listed here: they are the server's long options (`--max-outbuf` is
`max-outbuf`), read from the parser that `selchat.config.build_parser` makes, and each value
goes through that option's own check (its `type` and `choices`). So an option added to the
parser is a key of the file at once, with the same bounds and the same words when it is wrong.

* A value on the command line wins over the file's (a repeatable option's whole list too).
* An unknown key, a value of the wrong kind or out of bounds, or a file that is not TOML stops
  the start with one line: the file, the key, and why (`ConfigError`).
* `--check-config` prints the values in force as a TOML file (`render`), each marked with where
  it came from; `example()` writes docs/selchat.example.toml (every key, its default, one line
  of help), and a test keeps that file equal to it.

`python -m selchat.ops.configfile > docs/selchat.example.toml` regenerates the example.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.9 and 3.10 (setup.cfg installs tomli there)
    import tomli as tomllib

# Options that are not settings: they ask the command to do something else.
NOT_IN_FILE = frozenset({"help", "config", "check_config", "backup"})


class ConfigError(ValueError):
    """A configuration that cannot be used; str() is the one line to print or log."""


def file_options(parser: argparse.ArgumentParser) -> Dict[str, argparse.Action]:
    """{key: action} for every option a file may set, in the parser's order."""
    options: Dict[str, argparse.Action] = {}
    for action in parser._actions:
        if action.dest in NOT_IN_FILE:
            continue
        long = [flag for flag in action.option_strings if flag.startswith("--")]
        if long:
            options[long[0][2:]] = action
    return options


def read(path: str, parser: argparse.ArgumentParser) -> Dict[str, Any]:
    """The settings of the file at `path` as {dest: value}, checked; ConfigError otherwise."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not TOML: not UTF-8 text") from None
    return read_text(text, path, parser)


def read_text(text: str, path: str, parser: argparse.ArgumentParser) -> Dict[str, Any]:
    """`read`, for the text of a file named `path` (in the messages)."""
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not TOML: {exc}") from None
    options = file_options(parser)
    values: Dict[str, Any] = {}
    for key, raw in table.items():
        action = options.get(key)
        if isinstance(raw, dict):
            raise ConfigError(f"{path}: {key}: a table; every option is a key at the top of the file")
        if action is None:
            close = difflib.get_close_matches(key.replace("_", "-"), list(options), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{path}: {key}: not an option{hint}; docs/selchat.example.toml lists them")
        try:
            values[action.dest] = _convert(action, raw)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
            raise ConfigError(f"{path}: {key}: {exc}") from None
    return values


def _convert(action: argparse.Action, raw: Any) -> Any:
    if isinstance(raw, dict):
        raise ValueError("a table; every option is a key at the top of the file")
    if action.nargs == 0:  # a switch (store_true and the like)
        if not isinstance(raw, bool):
            raise ValueError(f"{_show(raw)} is not true or false")
        return action.const if raw else action.default
    if isinstance(action, argparse._AppendAction):
        items = raw if isinstance(raw, list) else [raw]
        return [_scalar(action, item) for item in items]
    if isinstance(raw, list):
        raise ValueError(f"a list, but this option takes one value")
    return _scalar(action, raw)


def _scalar(action: argparse.Action, raw: Any) -> Any:
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise ValueError(f"{_show(raw)} is not a value this option takes")
    if action.type is None and not isinstance(raw, str):
        raise ValueError(f"{_show(raw)} must be text, in quotes")
    text = raw if isinstance(raw, str) else repr(raw) if isinstance(raw, float) else str(raw)
    value = action.type(text) if callable(action.type) else text
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{_show(raw)} is not one of {', '.join(map(str, action.choices))}")
    return value


def _show(raw: Any) -> str:
    text = _toml(raw) if isinstance(raw, (str, int, float, bool, list)) else type(raw).__name__
    return text if len(text) <= 70 else text[:67] + "..."


# --- writing TOML -------------------------------------------------------------------------------


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # (a TOML basic string: the same escapes)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def _as_option(action: argparse.Action, value: Any) -> Any:
    """A setting as its option would be written (a choice the server keeps as a bool, back)."""
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, bool) and action.choices is not None and action.nargs != 0:
        choices = list(action.choices)
        return choices[0] if value else choices[-1]
    return value


def render(config: Any, sources: Mapping[str, str], parser: argparse.ArgumentParser) -> str:
    """The values in force, as a TOML file: one key a line, each marked with where it came from
    (`default`, `derived` from the other options, the file, or the command line)."""
    lines = ["# selchat-server --check-config: the values in force"]
    for key, action in file_options(parser).items():
        value = getattr(config, action.dest, None)
        source = sources.get(action.dest, "default")
        if value is None:
            lines.append(f"# {key} =  (not set; {source})")
            continue
        lines.append(f"{key} = {_toml(_as_option(action, value))}  # {source}")
    return "\n".join(lines) + "\n"


def example(parser: argparse.ArgumentParser, defaults: Any) -> str:
    """docs/selchat.example.toml: every key with its default and one line of help."""
    out: List[str] = [
        "# selchat.toml: every option of selchat-server, with its default.",
        "# Start with: selchat-server --config selchat.toml (an option also given on the",
        "# command line wins over the file). selchat-server --config F --check-config prints",
        "# the values in force. Keys are the long options without their dashes.",
        "# Regenerated by: python -m selchat.ops.configfile > docs/selchat.example.toml",
    ]
    keys = {action: key for key, action in file_options(parser).items()}
    for section in parser._action_groups:  # (in the sections of --help)
        shown = [action for action in section._group_actions if action in keys]
        if shown:
            out += ["", f"# --- {section.title} " + "-" * max(3, 86 - len(str(section.title)))]
        for action in shown:
            _example_entry(out, keys[action], action, defaults)
    return "\n".join(out) + "\n"


def _example_entry(out: List[str], key: str, action: argparse.Action, defaults: Any) -> None:
    """One key of the example: its help as comments, then its default (commented out when it
    has none, or when it is derived from the others)."""
    out.append("")
    out.extend("# " + line for line in _help_lines(action))
    value = getattr(defaults, action.dest, None)
    if action.default is argparse.SUPPRESS:
        out.append(f"# {key} = {_toml(_as_option(action, value))}  (derived when not given: "
                   "docs/protocol.md, \"Options\")")
    elif value is None or value == () or value == "":
        out.append(f"# {key} = ")
    else:
        out.append(f"{key} = {_toml(_as_option(action, value))}")


def _help_lines(action: argparse.Action, width: int = 92) -> Iterator[str]:
    text = (action.help or "").replace("%%", "%")
    if action.choices is not None and action.nargs != 0 and str(list(action.choices)[0]) not in text:
        text += f" ({' or '.join(map(str, action.choices))})"
    words, line = text.split(), ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            yield line
            line = word
        else:
            line = f"{line} {word}" if line else word
    if line:
        yield line


def sources_of(defaults: Mapping[str, Any], file_values: Mapping[str, Any], cli: Mapping[str, Any],
               path: Optional[str], derived: Tuple[str, ...]) -> Dict[str, str]:
    """Where each setting comes from, for --check-config."""
    sources = {dest: "default" for dest in defaults}
    for dest in derived:
        sources[dest] = "derived"
    for dest in file_values:
        sources[dest] = f"from {path}"
    for dest in cli:
        sources[dest] = "command line"
    return sources


def main() -> None:
    from selchat.config import ServerConfig, build_parser

    sys.stdout.write(example(build_parser(), ServerConfig()))


if __name__ == "__main__":
    main()
