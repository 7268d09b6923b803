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
