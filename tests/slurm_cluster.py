"""A real single-node SLURM cluster (slurm-wlm 22.05 + munge) for the SLURM tests, no systemd.

``SlurmCluster.start()`` installs the packages if needed (Debian: ``apt-get install -y
--no-install-recommends slurm-wlm munge``, as root), writes a munge key and slurm.conf into a
private temp folder, starts munged, slurmctld and slurmd in the foreground as child processes
(their pids kept), waits until the node is idle, and ``stop()`` ends exactly those processes.
Anything that makes this impossible raises :class:`SlurmUnavailable` with the reason.

Settings found by hand on a single-node cluster:
``SlurmUser=root``, ``ProctrackType=proctrack/linuxproc``, ``TaskPlugin=task/none``, no
accounting (use ``scontrol show job``), one node ``NodeAddr=127.0.0.1`` named after this host
with CPUs/RealMemory from ``slurmd -C``; ``AuthInfo=cred_expire=10`` and 1 s scheduler intervals
so a requeued job restarts in ~10 s.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "scancel", "srun", "sinfo")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be installed or started on this machine (the reason is the message)."""


def skip_or_fail(reason: str) -> None:
    """No cluster: the SLURM tests skip, or with ``FT_REQUIRE_SLURM=1`` (set by ``.ci/run``) fail,
    naming why, so a broken install cannot turn them off silently in CI."""
    import pytest

    if os.environ.get("FT_REQUIRE_SLURM") == "1":
        pytest.fail(f"SLURM required (FT_REQUIRE_SLURM=1) but unavailable: {reason}")
    pytest.skip(f"no SLURM test cluster on this machine: {reason}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _have_binaries() -> bool:
    return all(shutil.which(b) for b in DAEMONS + CLIENTS)


def ensure_installed() -> None:
    """Install slurm-wlm + munge with apt if they are missing (root only)."""
    if _have_binaries():
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmUnavailable("slurm-wlm/munge are not installed and cannot be installed here (needs root and apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "slurm-wlm", "munge"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:  # stale package lists: refresh once and retry
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True)
        result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0 or not _have_binaries():
        raise SlurmUnavailable(f"apt-get install slurm-wlm munge failed: {result.stderr.strip()[-500:]}")


class SlurmCluster:
    def __init__(self, root: Path | None = None, partition: str = "ci"):
        # Short path: the munge socket path must fit in a UNIX socket address (108 bytes).
        self._own_root = root is None
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="ftslurm-"))
        self.partition = partition
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    # ------------------------------------------------------------------ setup
    def start(self, timeout: float = 30.0) -> "SlurmCluster":
        if os.geteuid() != 0:
            raise SlurmUnavailable("the test cluster runs its daemons as root (SlurmUser=root); not root here")
        ensure_installed()
        self.hostname = socket.gethostname().split(".")[0]
        try:
            socket.gethostbyname(self.hostname)
        except OSError:
            # Lightning uses the node name (SLURM_NODELIST) as MASTER_ADDR: it must resolve.
            with open("/etc/hosts", "a") as hosts:
                hosts.write(f"\n127.0.0.1 {self.hostname}\n")
        for sub in ("state", "spool", "munge", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        try:
            self._start_munge()
            self._write_conf()
            self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-i", "-f", str(self.conf)])
            self._wait(lambda: self._ok(["scontrol", "ping"], "UP"), timeout, "slurmctld did not answer `scontrol ping`")
            self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.hostname])
            self._wait(self._node_idle, timeout, "the node did not become idle")
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self.munge_socket = self.root / "munge" / "munge.socket"
        self._spawn("munged", [
            "munged", "--foreground", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
            f"--pid-file={self.root / 'munge' / 'munged.pid'}", f"--seed-file={self.root / 'munge' / 'munged.seed'}",
            f"--log-file={self.root / 'log' / 'munged.log'}",
        ])
        self._wait(self.munge_socket.exists, 10, "munged did not create its socket")

    def _write_conf(self) -> None:
        probe = subprocess.run(["slurmd", "-C"], capture_output=True, text=True)
        node = next((line for line in probe.stdout.splitlines() if line.startswith("NodeName=")), None)
        if probe.returncode != 0 or node is None:
            raise SlurmUnavailable(f"`slurmd -C` failed: {probe.stderr.strip()}")
        node = re.sub(r"^NodeName=\S+", f"NodeName={self.hostname}", node)
        r = self.root
        self.conf.write_text(f"""\
ClusterName=ftci
SlurmctldHost={self.hostname}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
GresTypes=gpu
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
KillWait=5
MinJobAge=600
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd.log'}
{node} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName={self.partition} Nodes={self.hostname} Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        try:
            self.procs[name] = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()  # the child keeps its own copy of the descriptor

    def _wait(self, ready, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise SlurmUnavailable(f"{name} exited with {proc.returncode}: {self.logs(name)}")
            if ready():
                return
            time.sleep(0.2)
        raise SlurmUnavailable(f"{what} within {timeout:.0f} s: {self.logs()}")

    def _ok(self, argv, needle: str) -> bool:
        r = subprocess.run(argv, env=self.env, capture_output=True, text=True)
        return r.returncode == 0 and needle in r.stdout

    def _node_idle(self) -> bool:
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True)
        return r.returncode == 0 and r.stdout.strip() == "idle"

    def logs(self, *names: str, tail: int = 1500) -> str:
        names = names or ("munged", "slurmctld", "slurmd")
        out = []
        for name in names:
            for f in (self.root / "log" / f"{name}.log", self.root / "log" / f"{name}.stdout"):
                if f.exists() and f.stat().st_size:
                    out.append(f"--- {f.name}\n{f.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    # ---------------------------------------------------------------- teardown
    def stop(self) -> None:
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            # Leave no job steps behind: cancel whatever is still queued or running.
            subprocess.run(["scancel", "--partition", self.partition], env=self.env, capture_output=True, timeout=10)
            end = time.monotonic() + 10
            while time.monotonic() < end and self.squeue():
                time.sleep(0.3)
        for name in reversed(DAEMONS):  # slurmd, slurmctld, then munged
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self._own_root and not self.procs:
            shutil.rmtree(self.root, ignore_errors=True)

    def squeue(self) -> list[str]:
        r = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True)
        return r.stdout.split() if r.returncode == 0 else []

    # ------------------------------------------------------------------- jobs
    def sbatch(self, args: list[str], cwd: Path, env: dict | None = None) -> int:
        r = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env={**self.env, **(env or {})},
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"sbatch failed ({r.returncode}): {r.stderr.strip()}\n{self.logs('slurmctld')}")
        return int(r.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, Restarts, ExitCode, StdOut, ...)."""
        r = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], env=self.env, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"scontrol show job {job_id}: {r.stderr.strip()}")
        return dict(field.split("=", 1) for field in r.stdout.split() if "=" in field)

    def wait(self, job_id: int, timeout: float, until=None) -> dict[str, str]:
        """Poll every second until the job ends (or ``until(info)`` is true); follows requeues."""
        end = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if (until(info) if until else info["JobState"] in FINAL_STATES):
                return info
            if time.monotonic() > end:
                raise TimeoutError(f"job {job_id} still {info['JobState']} after {timeout:.0f} s\n{self.logs()}")
            time.sleep(1)

    def scancel(self, *args: str) -> None:
        subprocess.run(["scancel", *args], env=self.env, check=True, capture_output=True)
