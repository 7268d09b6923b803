"""The docs cannot drift: conf/README.md is a fresh render of conf/, and every command and
config key the README shows exists."""

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from ft_train import config_reference as ref
from ft_train.config import CONF_DIR, compose_tool_config

from .conftest import REPO

README = REPO / "README.md"
# The README, then the guides it links to: their commands run after the README's (they use its outputs).
_ORDER = ("training.md", "scale.md")  # guides whose commands use what earlier ones wrote
DOCS = [README, *(REPO / "docs" / n for n in _ORDER),
        *sorted(p for p in (REPO / "docs").glob("*.md") if p.name not in _ORDER)]


def docs_text() -> str:
    return "\n".join(p.read_text() for p in DOCS)


SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
# Which config file each command composes (ft-prep task=encode reads encode.yaml).
TOOL_CONFIG = {"ft-train": "train", "ft-prep": "prep", "ft-export": "export", "ft-eval": "eval",
               "ft-infer": "infer", "ft-demo": "demo"}


def test_parser_reads_keys_values_and_comments(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text(
        "# header line\n\n"
        "defaults:\n  - model: tiny   # the network\n\n"
        "# about a\n"
        "a: 1            # inline a\n"
        "# --- part two ---\n"
        "b:\n"
        "  c: [1, 2]     # c's doc\n"
        "                # continued\n"
        "  # about d\n"
        "  d: 'x # not a comment'\n"
        "e:\n  - p\n  - q\n"
    )
    doc = ref.parse_yaml_doc(path)
    assert doc.header == "header line"
    assert [(d.key, d.doc) for d in doc.defaults] == [("model: tiny", "the network")]
    got = {e.key: (e.value, e.doc, e.section) for e in doc.entries}
    assert got == {
        "a": ("1", "about a inline a", ""),
        "b": ("", "", "part two"),
        "b.c": ("[1, 2]", "c's doc continued", "part two"),
        "b.d": ("'x # not a comment'", "about d", "part two"),
        "e": ("p, q", "", "part two"),
    }
    assert ref.yaml_leaf_keys(path) == {"a", "b.c", "b.d", "e"}


def test_every_config_key_is_in_the_reference():
    assert ref.undocumented() == []


def test_reference_page_is_up_to_date():
    page = (CONF_DIR / "README.md").read_text()
    assert page == ref.render(), "run `python -m ft_train.config_reference`"
    # Facts read here, not by the renderer: defaults as YAML reads them, comments as written.
    callbacks = yaml.safe_load((CONF_DIR / "callbacks" / "default.yaml").read_text())
    assert f"| `callbacks.perf.stall_fraction` | `{callbacks['perf']['stall_fraction']}` |" in page
    assert f"| `callbacks.checkpoint.every_n_steps` | `{callbacks['checkpoint']['every_n_steps']}` |" in page
    validation = yaml.safe_load((CONF_DIR / "callbacks" / "validation.yaml").read_text())
    assert (f"| `callbacks.validation.sampler.steps` | `{validation['sampler']['steps']}` |") in page
    assert ("| `callbacks.validation.seed` | `0` | clip i is sampled from noise seeded seed + i |") in page
    defaults = yaml.safe_load((CONF_DIR / "train.yaml").read_text())["defaults"]
    callbacks_default = next(d["callbacks"] for d in defaults if isinstance(d, dict) and "callbacks" in d)
    assert f"| `callbacks` | `{callbacks_default}` | `default`, `validation` |" in page


def reference_section(heading: str) -> list[tuple[str, str]]:
    """(key, default as written) of every row of one ``####`` section's table in conf/README.md."""
    text = (CONF_DIR / "README.md").read_text()
    assert f"\n#### {heading}\n" in text, f"conf/README.md has no section #### {heading}"
    start = text.index(f"\n#### {heading}\n")
    body = text[start + 1 :].split("\n#", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \| (?:`(.*?)`|—) \|", body, flags=re.M)
    assert rows, f"no table under #### {heading}"
    return [(key, value.replace("\\|", "|")) for key, value in rows]


def test_validation_keys_are_listed_as_a_user_types_them():
    """The validation callback is added with ``+callbacks@callbacks.validation=validation``, so the
    reference lists its keys as ``callbacks.validation.<key>``: each one, set to its listed
    default, composes (an unknown key fails in Hydra's struct mode), and the real composition
    holds that default under that name."""
    from omegaconf import OmegaConf

    add = "+callbacks@callbacks.validation=validation"
    rows = reference_section(add)
    keys = [k for k, _ in rows]
    assert "callbacks.validation.shards" in keys and "callbacks.validation.sampler.steps" in keys
    assert all(k.startswith("callbacks.validation.") for k in keys), keys
    listed = [(k, v) for k, v in rows if v]
    assert len(listed) >= 20
    # Values with Hydra's own syntax (the comma of ${oc.select:a,b}) go in quotes, as a user would.
    overrides = [f"{k}='{v}'" if "," in v or "$" in v else f"{k}={v}" for k, v in listed]
    cfg = _compose("train", [add, *overrides])
    raw = OmegaConf.to_container(cfg, resolve=False)
    for key, value in listed:
        node = raw
        for part in key.split("."):
            node = node[part]
        assert node == yaml.safe_load(value), key
    plain = OmegaConf.to_container(_compose("train", [add]), resolve=False)
    assert plain["callbacks"]["validation"] == raw["callbacks"]["validation"]  # the listed defaults are the real ones
    assert "checkpoint" in raw["callbacks"]  # added beside the default callbacks, not instead of them


def readme_commands() -> list[list[str]]:
    """Every command line in the bash blocks of the README and its guides (``DOCS``), as argv
    lists (continuations joined, `&&` chains split, leading VAR=value assignments dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", docs_text(), flags=re.S):
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            line = line.split(" #", 1)[0].strip()
            if not line or line.startswith("#"):
                continue
            for part in re.split(r"&&|;", line):
                argv = shlex.split(part)
                while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):
                    argv = argv[1:]
                if argv:
                    commands.append(argv)
    return commands


def overrides_of(argv: list[str]) -> tuple[str, list[str]] | None:
    """(config name, overrides) for a command that composes a Hydra config, else None."""
    if argv[0] == "sbatch":
        script = next((i for i, a in enumerate(argv) if a.endswith(".sh")), None)
        assert script is not None, f"README: sbatch without a script: {argv}"
        assert (REPO / argv[script]).exists(), f"README: {argv[script]} does not exist"
        return ("train" if argv[script].endswith("train.sh") else "prep"), argv[script + 1 :]
    if argv[0] in TOOL_CONFIG:
        args = [a for a in argv[1:] if "=" in a]
        name = TOOL_CONFIG[argv[0]]
        if argv[0] == "ft-prep" and "task=encode" in args:
            name, args = "encode", [a for a in args if a != "task=encode"]
        return name, args
    return None


def test_readme_commands_exist_and_their_overrides_compose():
    commands = readme_commands()
    assert any(c[0] == "pytest" for c in commands), "README must show the test command"
    checked = 0
    for argv in commands:
        if argv[0].startswith("ft-"):
            assert argv[0] in SCRIPTS, f"README runs {argv[0]}, which pyproject.toml does not install"
        found = overrides_of(argv)
        if found is None:
            continue
        name, overrides = found
        assert (CONF_DIR / f"{name}.yaml").exists(), f"README: {argv[0]} has no conf/{name}.yaml"
        try:
            _compose(name, overrides)
        except SystemExit as exc:
            pytest.fail(f"README command `{' '.join(argv)}` does not compose: {exc}")
        checked += 1
    assert checked >= 5


def _compose(name: str, overrides: list[str]):
    # Unset required keys (???) are fine here: the README may show a command whose other keys
    # are set elsewhere; only unknown keys and bad values are errors.
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name=name, overrides=overrides)
    except Exception as exc:
        raise SystemExit(str(exc)) from None


def test_config_keys_named_in_the_readme_exist():
    """Inline `key=value` spans in the prose must be settable in some tool's config."""
    spans = set(re.findall(r"`([a-z_][\w.@/+-]*=[^`\s]*)`", docs_text()))
    spans = {s for s in spans if not re.match(r"^[A-Z_]+=", s)}
    assert spans, "the README names no config keys?"
    bad = []
    for span in sorted(spans):
        if span.endswith("="):  # `strategy=`: a group or key named without a value
            key = span[:-1]
            if (CONF_DIR / key).is_dir() or any(_has_key(name, key) for name in TOOL_CONFIG.values()):
                continue
            bad.append(span)
            continue
        ok = False
        for name in TOOL_CONFIG.values():
            if not (CONF_DIR / f"{name}.yaml").exists():
                continue
            try:
                _compose(name, [span])
                ok = True
                break
            except SystemExit:
                continue
        if not ok:
            bad.append(span)
    assert bad == [], f"README names config keys no config has: {bad}"


def _has_key(name: str, key: str) -> bool:
    from omegaconf import OmegaConf

    if not (CONF_DIR / f"{name}.yaml").exists():
        return False
    return OmegaConf.select(_compose(name, []), key, default="__missing__") != "__missing__"


def test_compose_tool_config_names_the_file_for_unknown_keys():
    with pytest.raises(SystemExit, match="export.yaml"):
        compose_tool_config("export", ["no_such_key=1"], "ft-export", "ft-export ckpt=A out=B")


def test_paths_the_readme_names_exist():
    """Every repository path the README and its guides name in code spans (the "where is X"
    table among them) exists."""
    names = set(re.findall(r"`((?:ft_train|data_tools|conf|slurm|bench|tests|docs)/[\w./-]*)`", docs_text()))
    assert len(names) > 20
    missing = sorted(n for n in names if not (REPO / n).exists() and "*" not in n)
    assert missing == [], f"README / docs name paths that do not exist: {missing}"
