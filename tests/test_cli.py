"""The one runner every tool's command line goes through (ft_train/cli.py)."""

import pytest

from ft_train.cli import Tool
from ft_train.config import CONF_DIR


def tool(run, **kw):
    return Tool("ft-x", "export", "ft-x: the help text.", "ft-x ckpt=a out=b", run=run, **kw)


def test_help_prints_the_doc_and_the_config_with_its_comments(capsys):
    assert tool(lambda cfg: None).main(["-h"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ft-x: the help text.") and (CONF_DIR / "export.yaml").read_text() in out


def test_success_passes_the_composed_config_and_prints_the_report(capsys):
    seen = {}
    t = tool(lambda cfg: seen.update(cfg) or "done", report=lambda r: f"ft-x: {r}")
    assert t.main(["ckpt=a", "out=b", "dtype=fp16"]) == 0
    assert (seen["ckpt"], seen["out"], seen["dtype"]) == ("a", "b", "fp16")
    assert capsys.readouterr().out.strip() == "ft-x: done"


def test_errors_are_one_line_naming_the_tool_unless_the_full_error_is_asked(monkeypatch):
    def fail(cfg):
        raise FileNotFoundError("ckpt: no checkpoint at a")

    with pytest.raises(SystemExit, match=r"^ft-x: ckpt: no checkpoint at a$"):
        tool(fail).main(["ckpt=a", "out=b"])
    with pytest.raises(SystemExit, match=r"^ft-x: set ckpt, out \(e\.g\. ft-x ckpt=a out=b\)$"):
        tool(fail).main([])
    with pytest.raises(SystemExit, match=r"^ft-x: Could not override 'nope'"):
        tool(fail).main(["nope=1"])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(FileNotFoundError):
        tool(fail).main(["ckpt=a", "out=b"])
    with pytest.raises(RuntimeError):  # not the user's to fix: a traceback, never swallowed
        tool(lambda cfg: (_ for _ in ()).throw(RuntimeError("bug"))).main(["ckpt=a", "out=b"])


def test_build_errors_are_one_line_too():
    def build(cfg):
        raise ValueError("dtype=fp7 is not a dtype")

    with pytest.raises(SystemExit, match=r"^ft-x: dtype=fp7 is not a dtype$"):
        tool(lambda cfg: None, build=build).main(["ckpt=a", "out=b"])
