"""Where the Hydra config tree lives, and composing it for the small command-line tools."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# conf/ sits beside the packages (the layout is fixed); an editable install uses it in place.
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_tool_config(config_name: str, overrides: list[str], tool: str, example: str) -> dict[str, Any]:
    """Compose ``conf/<config_name>.yaml`` with ``key=value`` overrides into a plain dict.

    Errors are one line for people: Hydra's own (bad override syntax, unknown key) name the
    config file to look in; unset required keys (``???``) are listed with an ``example`` command.
    Raises ``SystemExit`` with that line, prefixed by ``tool``.
    """
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=overrides)
    except Exception as exc:
        raise SystemExit(f"{tool}: {exc} (options are the keys of {CONF_DIR / (config_name + '.yaml')})") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise SystemExit(f"{tool}: set {', '.join(missing)} (e.g. {example})")
    return OmegaConf.to_container(cfg, resolve=True)


class ConfigError(ValueError):
    """A setting the user has to change. ``ft-train`` prints it as one line naming the key, its
    value and what is allowed (the traceback only with ``HYDRA_FULL_ERROR=1``)."""


# Numbers the code reads, with what is allowed: (key, integer?, lowest, lowest allowed itself?,
# highest (excluded) or None, text). Keys absent from a config (another data module) are skipped.
VALUE_RULES: tuple[tuple[str, bool, float, bool, float | None, str], ...] = (
    ("stage.max_steps", True, 1, True, None, "an integer >= 1"),
    ("data.batch_size", True, 1, True, None, "an integer >= 1"),
    ("data.num_workers", True, 0, True, None, "an integer >= 0 (0 = load in the training process)"),
    ("data.num_frames", True, 1, True, None, "an integer 4k+1 (e.g. 81)"),
    ("trainer.accumulate_grad_batches", True, 1, True, None, "an integer >= 1 (1 = no accumulation)"),
    ("trainer.log_every_n_steps", True, 1, True, None, "an integer >= 1"),
    ("trainer.num_nodes", True, 1, True, None, "an integer >= 1"),
    ("trainer.gradient_clip_val", False, 0, True, None, "a number >= 0, or null (no clipping)"),
    ("optim.optimizer.lr", False, 0, False, None, "a number > 0"),
    ("optim.optimizer.weight_decay", False, 0, True, None, "a number >= 0"),
    ("optim.scheduler.warmup_steps", True, 0, True, None, "an integer >= 0"),
    ("callbacks.checkpoint.every_n_steps", True, 0, True, None, "an integer >= 0 (0 = only at the end)"),
    ("callbacks.checkpoint.keep_last", True, 1, True, None, "an integer >= 1"),
    ("callbacks.ema.decay", False, 0, True, 1, "a number in [0, 1) (0 = off)"),
    ("callbacks.ema.update_after_step", True, 0, True, None, "an integer >= 0"),
    ("faults.max_nonfinite_steps", True, 1, True, None, "an integer >= 1 (non-finite steps in a row that stop the run)"),
    ("faults.max_skipped_fraction", False, 0, True, 1.000001, "a number in [0, 1]"),
    ("faults.skip_check_after", True, 0, True, None, "an integer >= 0"),
    ("seed", True, 0, True, None, "an integer >= 0"),
)

# What to give for a required key (``???``) that an experiment leaves to the command line.
REQUIRED_HINTS = {
    "model.pretrained": "a local Wan2.1-I2V diffusers folder with transformer/, vae/, text_encoder/ and image_encoder/",
    "data.shards": "a folder of .tar shards, a brace pattern or a glob",
    "data.encoders.wan": "a local Wan2.1-I2V diffusers folder",
    "data.encoders.wav2vec": "a local wav2vec2 folder",
}


def check_values(cfg) -> None:
    """Every number in :data:`VALUE_RULES` that ``cfg`` has is of its type and range; raises
    :class:`ConfigError` naming the first that is not."""
    from omegaconf import OmegaConf

    for key, integer, low, low_ok, high, allowed in VALUE_RULES:
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if value is None:  # absent here, or null (trainer.gradient_clip_val: no clipping)
            continue
        ok_type = not isinstance(value, bool) and (isinstance(value, int) if integer else isinstance(value, (int, float)))
        if not ok_type or value < low or (value == low and not low_ok) or (high is not None and value >= high):
            raise ConfigError(f"{key}={value}: must be {allowed}")


def check_required(cfg) -> None:
    """Keys still ``???`` (left for the command line by an experiment) are named together, each
    with what to give."""
    from omegaconf import OmegaConf

    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        wants = "; ".join(f"{k}=... ({REQUIRED_HINTS[k]})" if k in REQUIRED_HINTS else f"{k}=..." for k in missing)
        experiment = OmegaConf.select(cfg, "name", default=None)
        raise ConfigError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set (???) "
                          f"in experiment {experiment}: add {wants}")


def _flat_keys(node, prefix: str = "") -> list[str]:
    from omegaconf import DictConfig

    keys = []
    for key in node.keys() if isinstance(node, DictConfig) else ():
        path = f"{prefix}.{key}" if prefix else str(key)
        keys.append(path)
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            keys.extend(_flat_keys(child, path))
    return keys


def _arguments(target: str) -> list[str] | None:
    """The argument names of the callable at ``target`` (its ``config_keys()`` where it has one),
    following ``**kwargs`` a class passes up to its bases' ``__init__``; None when it takes any,
    or cannot be imported or inspected here (instantiating it will report that)."""
    import inspect

    from hydra.utils import get_object

    def named(fn, skip_first: bool) -> tuple[list[str], bool]:
        params = list(inspect.signature(fn).parameters.values())[int(skip_first):]
        return ([p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)],
                any(p.kind is p.VAR_KEYWORD for p in params))

    try:
        obj = get_object(target)
        if callable(getattr(obj, "config_keys", None)):
            return list(obj.config_keys())
        if not inspect.isclass(obj) or "__new__" in vars(obj):
            names, open_ended = named(obj, skip_first=False)
            return None if open_ended else names
        names = []
        for klass in obj.__mro__:
            if klass is object:
                return None
            if "__init__" in vars(klass):
                more, open_ended = named(klass.__init__, skip_first=True)
                names += [n for n in more if n not in names]
                if not open_ended:
                    return names
    except Exception:  # noqa: BLE001 - not ours to judge here
        return None
    return None


def _listed(names: list[str], most: int = 8) -> str:
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


def check_added_keys(cfg, overrides: list[str]) -> None:
    """Refuse a ``+key=value`` override that nothing reads: a setting added to a plain settings
    node (``+stage.max_step=5``) is a typo of an existing key, or a key of another version. Added
    keys are fine in a new object (``+callbacks.NAME={_target_: ...}``) and as arguments its
    ``_target_`` takes (``+loss.nan_calls=[1]`` with a loss that takes them). The error names the
    closest existing key."""
    import difflib

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import DictConfig

    added = [o for o in OverridesParser.create().parse_overrides(list(overrides)) if o.is_add() and not o.is_force_add()]
    known = None
    for override in added:
        key = override.key_or_group
        if override.package is not None or (CONF_DIR / key).is_dir():
            continue  # a config group (+speed=fp8), not a value
        if key.split(".")[0] == "hydra":
            continue
        parts = key.split(".")
        node = cfg
        for i, part in enumerate(parts):
            target = node.get("_target_") if isinstance(node, DictConfig) else None
            if target is not None:  # an object's argument
                names = None if part.startswith("_") else _arguments(str(target))
                if names is None or part in names:
                    break
                close = difflib.get_close_matches(part, names, n=1, cutoff=0.6)
                raise ConfigError(f"{override.input_line}: {target} takes no argument {part!r} "
                                  + (f"(did you mean {close[0]}?)" if close else f"(it takes {_listed(names)})"))
            child = node._get_node(part) if isinstance(node, DictConfig) else None
            if isinstance(child, DictConfig) and i < len(parts) - 1:
                node = child
                continue
            if isinstance(child, DictConfig) and "_target_" in child:
                break  # a whole new object (+logger.NAME={_target_: ...})
            if known is None:
                added_keys = {o.key_or_group for o in added}
                known = [k for k in _flat_keys(cfg) if k not in added_keys and not k.startswith("hydra")]
            parent = ".".join(parts[:i])
            siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == parent]
            close = [f"{parent}.{c}" if parent else c for c in difflib.get_close_matches(part, siblings, n=1, cutoff=0.6)]
            close = close or difflib.get_close_matches(key, [k for k in known if k != parent], n=1, cutoff=0.8)
            if close:
                hint = f"did you mean {close[0]}?"
            elif parent:
                hint = f"{parent} has {_listed(siblings)}"
            else:
                hint = "see conf/README.md for the keys"
            raise ConfigError(f"{override.input_line}: no such setting, nothing would read it; {hint}")
