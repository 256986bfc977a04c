"""A private one-node SLURM cluster for the tests: its own munge key and socket, its own slurm.conf,
ports, state and spool under one temp dir, every daemon bound to this host (127.0.0.1), started in
about a second and stopped without leaving a process behind. Debian's slurm-wlm and munge packages
provide the binaries (`make install` installs them when root).

    cluster = SlurmCluster(tmp_dir).start()
    cluster.run("srun", "-n", "2", "hostname")        # sbatch, srun, scancel, scontrol, ... against it
    job = cluster.sbatch(script, cwd=run_dir, env=cluster.env(test_env))
    cluster.wait(job)                                   # its final state: COMPLETED, FAILED, ...
    cluster.stop()                                      # every daemon, every process a job left

A job's processes are told apart by ``SLURM_CONF`` in their environment (slurmd passes it on to
every step), so that ``stop`` and ``processes`` find them without knowing their ids.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from ports import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "sinfo", "scancel", "scontrol")
NODE_CPUS = 8  # more than the machine's cores (config_overrides): a sweep's 2-task jobs run side by side
# Every state a job passes through before it ends. SIGNALING: slurmctld is delivering a --signal=SIG@N to a
# running job (CI's poll saw it while the preempted test's job got its USR2 before the time limit)
PENDING_OR_RUNNING = {
    "PENDING",
    "CONFIGURING",
    "RUNNING",
    "SIGNALING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "RESIZING",
}
TIME_LIMIT_CHECK = "Testing job time limits"  # slurmctld's debug2 line, every 30 s: signals and limits


def _binary(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def missing_binaries() -> list[str]:
    return [name for name in (*DAEMONS, *CLIENTS) if _binary(name) is None]


def _free_ports(count: int, low: int = 30000, high: int = 45000) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        ports.append(free_port(low, high, taken=tuple(ports)))
    return ports


class SlurmCluster:
    """One node (this host at 127.0.0.1) in one partition ``debug``; ``root`` holds all it writes."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.started_at: float | None = None
        self._daemons: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------------ set-up
    def _write_munge_key(self) -> Path:
        munge = self.root / "munge"
        munge.mkdir(parents=True, exist_ok=True)
        os.chmod(munge, 0o700)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        return key

    def _write_conf(self) -> None:
        ctld_port, slurmd_port, srun_low = _free_ports(3)
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        lines = [
            "ClusterName=ditlab-test",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            f"SrunPortRange={srun_low}-{srun_low + 200}",
            # Job ids from a random start: Lightning's rendezvous port is 15000 + a job id's last 4 digits
            f"FirstJobId={random.randint(1000, 9000)}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire: also how long a requeued job waits before it may start again (default 120 s)
            f"AuthInfo=socket={self.munge_socket},cred_expire=5",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'log' / 'slurmd.log'}",
            "SlurmctldDebug=debug2",  # for TIME_LIMIT_CHECK
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "SchedulerType=sched/builtin",
            "SchedulerParameters=sched_interval=1",  # pending jobs (a requeued one) are looked at every second
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SlurmdParameters=config_overrides",  # NODE_CPUS, whatever this machine has
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "ReturnToService=2",
            "MinJobAge=600",  # a finished job stays visible to scontrol show job
            "KillWait=5",
            "InactiveLimit=0",
            "MessageTimeout=10",
            "JobRequeue=1",
            f"NodeName={self.host} NodeAddr=127.0.0.1 NodeHostname={self.host} CPUs={NODE_CPUS} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def env(self, base: dict | None = None) -> dict:
        """``base`` (default: this process's environment) pointed at this cluster."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        return {k: v for k, v in env.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_")) or k == "SLURM_CONF"}

    def _start_daemon(self, name: str, *args: str) -> None:
        out = (self.root / "log" / f"{name}.out").open("w")
        self._daemons[name] = subprocess.Popen(
            [_binary(name), *args],
            env=self.env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def start(self, timeout: float = 60) -> SlurmCluster:
        key = self._write_munge_key()
        self._write_conf()
        munge = self.root / "munge"
        self._start_daemon(
            "munged",
            "--foreground",
            "--force",  # root, and a key outside /etc/munge
            f"--key-file={key}",
            f"--socket={self.munge_socket}",
            f"--pid-file={munge / 'munged.pid'}",
            f"--log-file={self.root / 'log' / 'munged.log'}",
            f"--seed-file={munge / 'munged.seed'}",
        )
        try:
            self._wait_until(self.munge_socket.exists, timeout, "munged's socket")
            self.started_at = time.time()
            self._start_daemon("slurmctld", "-D", "-i", "-f", str(self.conf))
            self._start_daemon("slurmd", "-D", "-f", str(self.conf), "-N", self.host)
            self._wait_until(lambda: self.node_state() == "idle", timeout, "the node to be idle")
        except BaseException:
            self.stop()
            raise
        return self

    def node_state(self) -> str:
        return self.run("sinfo", "-h", "-N", "-o", "%t", check=False).stdout.strip()

    def _wait_until(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self._daemons.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}) while waiting for {what}:\n{self.logs()}")
            if ready():
                return
            time.sleep(0.1)
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}:\n{self.logs()}")

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-tail:]}"
            for path in sorted((self.root / "log").iterdir())
        )

    # ------------------------------------------------------------------ commands and jobs
    def run(self, *argv: str, check: bool = True, timeout: float = 60, env: dict | None = None, **kwargs):
        """A SLURM command against this cluster; its CompletedProcess (text)."""
        result = subprocess.run(
            [_binary(argv[0]) or argv[0], *argv[1:]],
            env=env or self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            **kwargs,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def sbatch(self, script: Path, *options: str, cwd: Path, env: dict) -> str:
        """Submit ``script``; its job id."""
        return self.run("sbatch", "--parsable", *options, str(script), cwd=cwd, env=env).stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job``'s fields (JobState, Restarts, ExitCode, ...); {} once SLURM forgot it."""
        out = self.run("scontrol", "-o", "show", "job", job_id, check=False).stdout.strip()
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: str, timeout: float = 300) -> dict[str, str]:
        """Wait until the job (requeues included) is over; its final fields."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") not in PENDING_OR_RUNNING:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout:.0f} s")

    def next_time_limit_check(self, timeout: float = 45) -> float:
        """Wait for slurmctld's next pass over the time limits (every 30 s: it sends ``--signal=SIG@N``
        and ends jobs past their limit); the time it was seen."""
        log = self.root / "log" / "slurmctld.log"
        seen = log.read_text(errors="replace").count(TIME_LIMIT_CHECK)
        self._wait_until(lambda: log.read_text(errors="replace").count(TIME_LIMIT_CHECK) > seen, timeout, "a check")
        return time.time()

    def processes(self, job_id: str | None = None) -> list[int]:
        """Live processes of this cluster (daemons, slurmstepd, tasks): ``SLURM_CONF`` is this cluster's
        conf in their environment; with ``job_id``, only that job's (SLURM_JOB_ID)."""
        wanted = f"SLURM_CONF={self.conf}".encode()
        job = f"SLURM_JOB_ID={job_id}".encode() if job_id else None
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if wanted in environ and state != "Z" and (job is None or job in environ):
                found.append(int(entry.name))
        return found

    # ------------------------------------------------------------------ tear-down
    def stop(self) -> list[int]:
        """Cancel every job, stop the daemons, SIGKILL whatever is left; the processes that were still
        there after the daemons stopped (none when every job ended as it should)."""
        if self._daemons.get("slurmctld") and self._daemons["slurmctld"].poll() is None:
            self.run("scancel", "--full", f"--user={os.getuid()}", check=False, timeout=20)
            deadline = time.monotonic() + 15
            while self._job_processes() and time.monotonic() < deadline:
                time.sleep(0.2)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._daemons.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        left = self.processes()
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return left

    def _job_processes(self) -> list[int]:
        """What the jobs run (tasks, slurmstepd): every process of the cluster but the daemons and
        slurmctld's helper (slurmscriptd)."""
        daemons = {proc.pid for proc in self._daemons.values() if proc.poll() is None}
        found = []
        for pid in self.processes():
            try:
                name = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if pid not in daemons and b"slurmscriptd" not in name:
                found.append(pid)
        return found
