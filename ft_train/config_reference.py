"""The config reference (``conf/README.md``), generated from the yaml files' own comments.

Every key a user can set is documented where it is defined: an inline ``# comment`` after the
key, or a comment block directly above it. This module walks ``conf/`` and writes those into one
markdown page — the tools' configs (``train.yaml``, ``prep.yaml``, ...), then every option of every
group of ``train.yaml`` — so the reference cannot drift from the configs:
``tests/test_config_reference.py`` fails when the committed page differs from a fresh render, or
when a key the yaml defines is missing from it.

Regenerate after changing a config::

    python -m ft_train.config_reference          # rewrites conf/README.md
    python -m ft_train.config_reference --check  # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .config import CONF_DIR

REFERENCE = CONF_DIR / "README.md"

# Tool configs at the top of conf/, in the order a user meets them, with the command that reads them.
TOOLS = {
    "train": "ft-train",
    "prep": "ft-prep",
    "encode": "ft-prep task=encode",
    "eval": "ft-eval",
    "export": "ft-export",
    "infer": "ft-infer",
    "demo": "ft-demo",
}

_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_@][\w.@/-]*|\"[^\"]+\"|'[^']+'):(?:\s+(?P<rest>.*))?$")
_ITEM = re.compile(r"^(?P<indent> *)- (?P<rest>.*)$")
_RULE = re.compile(r"^-{3,}\s*(?P<title>.*?)\s*-*$")  # `# --- clips ------` section rules


@dataclass
class Entry:
    """One key of a yaml file: dotted path, default as written, and its documentation."""

    key: str
    value: str
    doc: str = ""
    section: str = ""


@dataclass
class YamlDoc:
    """What a yaml file documents: its header comment, its ``defaults`` list and its keys."""

    header: str = ""
    package: str = ""
    defaults: list[Entry] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)


def _split_comment(text: str) -> tuple[str, str]:
    """``value  # comment`` → (value, comment), ignoring ``#`` inside quotes."""
    quote = None
    for i, ch in enumerate(text):
        if ch in "'\"":
            quote = None if quote == ch else (quote or ch)
        elif ch == "#" and quote is None and (i == 0 or text[i - 1] in " \t"):
            return text[:i].rstrip(), text[i + 1 :].strip()
    return text.rstrip(), ""


def _join(parts: list[str]) -> str:
    return " ".join(p for p in (s.strip() for s in parts) if p)


def parse_yaml_doc(path: Path) -> YamlDoc:
    """Read keys, defaults and comments of one config file (the subset of YAML our configs use:
    block mappings, flow values, block lists of scalars, and ``defaults`` lists)."""
    out = YamlDoc()
    lines = path.read_text().splitlines()
    stack: list[tuple[int, str]] = []  # (indent, key) of the open mappings
    pending: list[str] = []  # full-line comments waiting for the next key
    last: Entry | None = None  # the key a deeper-indented comment continues
    last_indent = -1
    last_inline = False
    section = ""
    seen_key = False
    list_owner: Entry | None = None  # a key whose value is a block list
    in_defaults = False
    header: list[str] = []

    for raw in lines:
        stripped = raw.strip()
        indent = len(raw) - len(raw.lstrip(" "))
        if not stripped:
            if not seen_key and header:
                header.append("")
            pending = []
            continue
        if stripped.startswith("#"):
            text = stripped[1:].strip()
            if text.startswith("@package"):
                out.package = text.split(None, 1)[1] if " " in text else ""
                continue
            rule = _RULE.match(text)
            if rule:
                section, pending = rule.group("title"), []
                continue
            if not seen_key:
                header.append(text)
            elif last is not None and last_inline and indent > last_indent:
                last.doc = _join([last.doc, text])  # a comment continued under the key's comment
            else:
                pending.append(text)
            continue

        item = _ITEM.match(raw)
        if item is not None:
            value, comment = _split_comment(item.group("rest"))
            if in_defaults:
                out.defaults.append(Entry(value, "", _join([*pending, comment])))
            elif list_owner is not None:
                list_owner.value = (list_owner.value + ", " if list_owner.value else "") + value
                if comment:
                    list_owner.doc = _join([list_owner.doc, comment])
            pending = []
            continue

        match = _KEY.match(raw)
        if match is None:
            raise ValueError(f"{path}: cannot read line {raw!r} (config_reference understands block mappings, lists and flow values)")
        seen_key = True
        key = match.group("key").strip("'\"")
        value, comment = _split_comment(match.group("rest") or "")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if not stack and key == "defaults":
            in_defaults, list_owner, last, pending = True, None, None, []
            stack.append((indent, key))
            continue
        if not stack:
            in_defaults = False
        dotted = ".".join([k for _, k in stack] + [key])
        entry = Entry(dotted, value, _join([*pending, comment]), section)
        pending = []
        if not in_defaults and not dotted.startswith("hydra"):
            out.entries.append(entry)
        last, last_indent, last_inline = entry, indent, bool(comment)
        list_owner = entry if value == "" else None
        if value == "":
            stack.append((indent, key))
    out.header = "\n".join(header).strip()
    # A mapping key that only opened a block list holds the list; one that opened a mapping has no value.
    return out


def yaml_leaf_keys(path: Path) -> set[str]:
    """The leaf keys OmegaConf reads from the file (the independent check on :func:`parse_yaml_doc`)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    cfg = OmegaConf.load(path)
    keys: set[str] = set()

    def walk(node, prefix: str) -> None:
        for k in node.keys():
            name = f"{prefix}{k}"
            if name in ("defaults", "hydra"):
                continue
            child = node._get_node(k)
            if isinstance(child, DictConfig) and not child._is_none() and len(child) > 0:
                walk(child, name + ".")
            elif not isinstance(child, (DictConfig, ListConfig)) or child._is_none() or len(child) == 0 or isinstance(child, ListConfig):
                keys.add(name)

    walk(cfg, "")
    return keys


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") or " "


def _table(entries: list[Entry], prefix: str = "") -> list[str]:
    rows = ["| key | default | meaning |", "|---|---|---|"]
    section = None
    for e in entries:
        if e.section and e.section != section:
            section = e.section
            rows.append(f"| **{_cell(section)}** | | |")
        value = f"`{_cell(e.value)}`" if e.value else "—"
        rows.append(f"| `{prefix}{e.key}` | {value} | {_cell(e.doc)} |")
    return rows


def _header_lines(doc: YamlDoc) -> list[str]:
    if not doc.header:
        return []
    return [" ".join(line for line in doc.header.splitlines()).strip(), ""]


def group_prefix(group: str, doc: YamlDoc) -> str:
    """The prefix a user types before a group option's keys: the group name, or the file's
    ``# @package`` (none for ``_global_``; e.g. ``callbacks.validation.`` for a callback added
    beside the group's default)."""
    if doc.package == "_global_":
        return ""
    return f"{doc.package or group}."


def option_heading(group: str, option: str, doc: YamlDoc) -> str:
    """How a user picks the option: ``group=option``, or, for a file whose package is a key
    inside the group (one more callback beside the default ones), the Hydra override that adds
    it there: ``+callbacks@callbacks.validation=validation``."""
    package = doc.package
    if package.startswith(group + ".") and package != "_global_":
        return f"+{group}@{package}={option}"
    return f"{group}={option}"


def render(conf_dir: Path = CONF_DIR) -> str:
    """The whole reference page as markdown."""
    out = [
        "# Config reference",
        "",
        "Generated from the comments in `conf/` by `python -m ft_train.config_reference`; do not edit",
        "by hand (`tests/test_config_reference.py` fails when this page and the configs disagree).",
        "Every key can be overridden on the command line as `key=value` (Hydra syntax: `+key=value`",
        "adds a key, `group=option` picks a file of a group).",
        "",
    ]
    tools = [name for name in TOOLS if (conf_dir / f"{name}.yaml").exists()]
    tools += sorted(p.stem for p in conf_dir.glob("*.yaml") if p.stem not in TOOLS)
    out.append("Contents: " + ", ".join(f"[{name}.yaml](#{name}yaml)" for name in tools) + ", [groups of train.yaml](#groups-of-trainyaml).")
    out.append("")
    for name in tools:
        doc = parse_yaml_doc(conf_dir / f"{name}.yaml")
        command = TOOLS.get(name, "")
        out += [f"## {name}.yaml", ""]
        if command:
            out += [f"Read by `{command}`.", ""]
        out += _header_lines(doc)
        if doc.defaults:
            out += ["| group | default option | options | meaning |", "|---|---|---|---|"]
            for d in doc.defaults:
                if ":" not in d.key:
                    continue
                group, option = (s.strip() for s in d.key.split(":", 1))
                options = sorted(p.stem for p in (conf_dir / group).glob("*.yaml")) if (conf_dir / group).is_dir() else []
                out.append(f"| `{group}` | `{option}` | {', '.join(f'`{o}`' for o in options) or ' '} | {_cell(d.doc)} |")
            out.append("")
        if doc.entries:
            out += _table(doc.entries) + [""]

    out += ["## Groups of train.yaml", "", "Pick an option with `group=option`; its keys are then set as `group.key=value`",
            "(an option added beside the group's own, such as `+callbacks@callbacks.validation=validation`,",
            "has its keys under that name: `callbacks.validation.key=value`).", ""]
    for group_dir in sorted(p for p in conf_dir.iterdir() if p.is_dir()):
        files = sorted(group_dir.glob("*.yaml"))
        if not files:
            continue
        out += [f"### {group_dir.name}/", ""]
        for path in files:
            doc = parse_yaml_doc(path)
            out += [f"#### {option_heading(group_dir.name, path.stem, doc)}", ""]
            out += _header_lines(doc)
            overrides = [d.key for d in doc.defaults]
            if overrides:
                out += ["Selects: " + ", ".join(f"`{o}`" for o in overrides), ""]
            if doc.entries:
                out += _table(doc.entries, group_prefix(group_dir.name, doc)) + [""]
    return "\n".join(out).rstrip() + "\n"


def undocumented(conf_dir: Path = CONF_DIR) -> list[str]:
    """Keys OmegaConf finds in a config file that the reference does not list (should be none)."""
    problems = []
    for path in sorted(conf_dir.rglob("*.yaml")):
        listed = {e.key for e in parse_yaml_doc(path).entries}
        for key in sorted(yaml_leaf_keys(path) - listed):
            problems.append(f"{path.relative_to(conf_dir)}: {key}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write conf/README.md, the config reference, from conf/*.yaml")
    parser.add_argument("--check", action="store_true", help="exit 1 if conf/README.md is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not REFERENCE.exists() or REFERENCE.read_text() != text:
            print(f"{REFERENCE} is out of date: run `python -m ft_train.config_reference`", file=sys.stderr)
            return 1
        return 0
    REFERENCE.write_text(text)
    print(f"wrote {REFERENCE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
