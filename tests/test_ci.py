""".ci/run is the README's install and test commands, with the SLURM tests required: a cluster
that cannot start fails CI, naming why, instead of skipping them."""

import re
import subprocess

import pytest

from .conftest import REPO
from .slurm_cluster import skip_or_fail

CI = REPO / ".ci" / "run"


def test_ci_runs_the_readme_commands_with_slurm_required():
    subprocess.run(["bash", "-n", str(CI)], check=True)  # parses
    lines = [line.strip() for line in CI.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    install = next(line.split(" && ft-demo")[0] for block in blocks for line in block.splitlines() if "pip install" in line)
    test = next(line.strip() for block in blocks for line in block.splitlines() if line.strip().startswith("pytest"))
    assert install in lines and test in lines
    assert lines.index("export FT_REQUIRE_SLURM=1") < lines.index(test)


def test_missing_cluster_fails_when_required_and_skips_otherwise(monkeypatch):
    monkeypatch.setenv("FT_REQUIRE_SLURM", "1")
    with pytest.raises(pytest.fail.Exception, match=r"SLURM required \(FT_REQUIRE_SLURM=1\) but unavailable: no apt-get"):
        skip_or_fail("no apt-get")
    monkeypatch.delenv("FT_REQUIRE_SLURM")
    with pytest.raises(pytest.skip.Exception, match="no SLURM test cluster on this machine: no apt-get"):
        skip_or_fail("no apt-get")
