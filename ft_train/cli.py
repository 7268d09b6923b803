"""One runner for the command-line tools (ft-prep, ft-export, ft-eval, ft-infer, ft-demo).

Each tool gives its config name, help text, an example command, the function that does the work
and the line to print after; the runner does the rest the same way everywhere: ``-h`` prints
the help and the config with its comments, ``key=value`` overrides compose ``conf/<name>.yaml``,
the tool's expected errors become one line naming the key or file (the traceback only with
``HYDRA_FULL_ERROR=1``, Hydra's own switch, which ft-train honours too), exit code 0 on success.
ft-train keeps Hydra's own command line (``--cfg``, multirun, ...).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

from .config import CONF_DIR, compose_tool_config


@dataclass(frozen=True)
class Tool:
    """A command-line tool.

    Attributes:
        name: the command (``ft-export``); prefixes every message.
        config: the config it composes (``conf/<config>.yaml``).
        doc: help text (the tool module's docstring).
        example: a command that works, shown when a required key is unset.
        run: the work, given the composed config (a dict); returns what ``report`` prints.
        report: the lines printed on success (None: nothing).
        errors: the exceptions that are the user's to fix, shown as one line.
        build: turns the composed dict into what ``run`` takes (e.g. a config dataclass).
        log_format: the logging format (None: leave logging as it is).
    """

    name: str
    config: str
    doc: str
    example: str
    run: Callable[[Any], Any]
    report: Callable[[Any], str] | None = None
    errors: tuple[type[BaseException], ...] = (FileNotFoundError, FileExistsError, KeyError, ValueError)
    build: Callable[[dict[str, Any]], Any] | None = None
    log_format: str | None = "{name}: %(levelname)s: %(message)s"

    def main(self, argv: list[str] | None = None) -> int:
        argv = sys.argv[1:] if argv is None else list(argv)
        if any(a in ("-h", "--help") for a in argv):
            print(self.doc)
            print((CONF_DIR / f"{self.config}.yaml").read_text())
            return 0
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights only ever come from local paths
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        if self.log_format:
            logging.basicConfig(level=logging.INFO, format=self.log_format.format(name=self.name))
        cfg = compose_tool_config(self.config, argv, self.name, self.example)
        try:
            result = self.run(self.build(cfg) if self.build else cfg)
        except self.errors as exc:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            message = str(exc.args[0]) if exc.args else str(exc)
            raise SystemExit(message if message.startswith(f"{self.name}: ") else f"{self.name}: {message}") from None
        if self.report is not None:
            print(self.report(result))
        return 0
