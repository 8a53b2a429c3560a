"""configs/slurm/*.sbatch under a real Slurm cluster on loopback (reference/slurm_local.md): one slurmctld and two
slurmd ("nodes" 127.0.0.1 and 127.0.0.2) started as root in a scratch directory, with munge and a fresh key (or
auth/none when munged is missing), fast credential expiry and scheduler passes so requeues restart in seconds.

- a job array (label.sbatch, --array=0-2) and a 2-node srun job (label_multinode.sbatch) give exactly the labels
  of a single-process run;
- a label job stopped mid-way twice, first as at its time limit (USR1 to the batch shell, which stops flowdistill
  and requeues itself), then by `scontrol requeue` (SIGTERM to everything), resumes from the ledger and ends with
  the uninterrupted labels: nothing missing, nothing twice;
- refresh.sbatch labels new videos into the current version and keeps resubmitting itself (--begin, singleton).

Skipped unless running as root with slurmctld / slurmd / sbatch installed
(``apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge``). Set FD_SLURM_KEEP=1 to keep
the scratch directory (daemon and job logs) after the run, FD_SLURM_AUTH=none to run without munged.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from labelkit import BIN, FAST, REPO, clean_env, content, label_cmd, make_teacher, make_videos

pytestmark = pytest.mark.slurm

SBIN_PATH = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
SLURM_DIR = REPO / "configs" / "slurm"
N_VIDEOS = 6
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# labelkit's fast settings with 4 query points per pair (the model time halves; orchestration is what is tested)
ARGS = [*FAST, "--set", "sampling.num_points=4"]
MARKER = "FD_SLURM_TEST_CLUSTER"        # in the environment of every daemon and job we start (teardown finds them)


def _which(name: str) -> str | None:
    return shutil.which(name, path=SBIN_PATH)


def _skip_reason() -> str | None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root (runs slurmctld/slurmd as root on loopback)"
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo") if not _which(b)]
    if missing:
        return (f"Slurm not installed ({', '.join(missing)} not found); "
                "apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge")
    return None


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _tail(path: Path, n: int = 40) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return f"({path}: missing)"
    return f"--- {path} (last {min(n, len(lines))} lines)\n" + "\n".join(lines[-n:])


class LocalSlurm:
    """slurmctld + 2 slurmd (+ munged) under ``base``; ``run``/``sbatch``/``wait`` talk to it."""

    NODES = ("127.0.0.1", "127.0.0.2")

    def __init__(self, base: Path):
        self.base = base
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = base / "slurm.conf"
        self.logs = base / "log"
        self.jobs_log = base / "jobs"
        self.env = clean_env(SLURM_CONF=str(self.conf), **{MARKER: str(base)})
        self.env["PATH"] = SBIN_PATH

    # -------------------------------------------------------------------------------------------- daemons
    def start(self) -> None:
        b = self.base
        for d in ("state", "log", "jobs", "munge", *(f"spool/{n}" for n in self.NODES)):
            (b / d).mkdir(parents=True, exist_ok=True)
        os.chmod(b, 0o755)
        munged = _which("munged")
        if munged and os.environ.get("FD_SLURM_AUTH", "munge") != "none":
            os.chmod(b / "munge", 0o711)                  # munged: the socket directory must be a+x
            key = b / "munge" / "munge.key"
            key.write_bytes(os.urandom(1024))
            os.chmod(key, 0o600)
            sock = b / "munge" / "munge.socket"
            self._spawn("munged", [munged, "-F", f"--socket={sock}", f"--key-file={key}",
                                   f"--log-file={b / 'log/munged.log'}", f"--pid-file={b / 'munge/munged.pid'}",
                                   f"--seed-file={b / 'munge/munged.seed'}"])
            deadline = time.monotonic() + 10
            while not sock.exists():
                if time.monotonic() > deadline or self.procs["munged"].poll() is not None:
                    raise RuntimeError("munged did not start\n" + _tail(b / "log/munged.log"))
                time.sleep(0.05)
            auth = f"AuthType=auth/munge\nCredType=cred/munge\nAuthInfo=socket={sock},cred_expire=5\n"
        else:
            auth = "AuthType=auth/none\nCredType=cred/none\nAuthInfo=cred_expire=5\n"
        ctld, *dports = _free_ports(1 + len(self.NODES))
        nodes = "".join(f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={p} Sockets=1 CoresPerSocket=2 "
                        f"ThreadsPerCore=1 RealMemory=1000 State=UNKNOWN\n" for n, p in zip(self.NODES, dports))
        self.conf.write_text(
            f"ClusterName=fdtest\nSlurmctldHost=localhost\nSlurmctldPort={ctld}\nSlurmUser=root\nSlurmdUser=root\n"
            f"{auth}StateSaveLocation={b}/state\nSlurmdSpoolDir={b}/spool/%n\n"
            f"SlurmctldPidFile={b}/slurmctld.pid\nSlurmdPidFile={b}/slurmd-%n.pid\n"
            f"SlurmctldLogFile={b}/log/slurmctld.log\nSlurmdLogFile={b}/log/slurmd-%n.log\n"
            "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nJobAcctGatherType=jobacct_gather/none\n"
            "AccountingStorageType=accounting_storage/none\nJobCompType=jobcomp/none\nSelectType=select/cons_tres\n"
            "SelectTypeParameters=CR_Core\nMpiDefault=none\nMailProg=/bin/true\nReturnToService=2\n"
            "SlurmdParameters=config_overrides\n"          # 2 cores per node even on a smaller machine
            "SchedulerType=sched/backfill\nSchedulerParameters=sched_interval=2,bf_interval=1\n"
            "InactiveLimit=0\nKillWait=5\nMinJobAge=600\n" + nodes +
            f"PartitionName=debug Nodes={','.join(self.NODES)} Default=YES MaxTime=INFINITE State=UP\n")
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-f", str(self.conf)])
        for n in self.NODES:
            self._spawn(f"slurmd-{n}", [_which("slurmd"), "-D", "-N", n, "-f", str(self.conf)])
        deadline = time.monotonic() + 60
        while True:
            r = self.run(["sinfo", "-h", "-N", "-o", "%t"], check=False)
            states = set(r.stdout.split())
            if r.returncode == 0 and states == {"idle"}:
                return
            dead = [k for k, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"Slurm did not come up (node states {sorted(states)}, exited: {dead})\n"
                                   + self.diagnostics())

    def _spawn(self, name: str, argv: list) -> None:
        out = open(self.logs / f"{name}.out", "ab")
        self.procs[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=self.env, cwd=self.base, start_new_session=True)
        out.close()

    def stop(self) -> None:
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.cancel_all()
        daemons = [p for k, p in self.procs.items() if k != "munged"]
        for group in (daemons, [self.procs[k] for k in self.procs if k == "munged"]):
            for p in group:
                if p.poll() is None:
                    p.terminate()
            for p in group:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=5)
        self._kill_stragglers()

    def _kill_stragglers(self) -> None:
        """slurmstepd and job processes of *this* cluster that outlived the daemons (found by MARKER)."""
        tag = f"{MARKER}={self.base}".encode() + b"\0"
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                env = (d / "environ").read_bytes()
            except OSError:
                continue
            if (b"\0" + env).find(b"\0" + tag) >= 0:
                try:
                    os.kill(int(d.name), signal.SIGKILL)
                except OSError:
                    pass

    def diagnostics(self) -> str:
        parts = [_tail(p) for p in sorted(self.logs.glob("*.log"))]
        parts += [_tail(p) for p in sorted(self.logs.glob("*.out")) if p.stat().st_size]
        return "\n".join(parts)

    # -------------------------------------------------------------------------------------------- clients
    def run(self, argv: list, check: bool = True, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
        r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=env or self.env, timeout=60,
                           **kw)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, argv))} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r

    def sbatch(self, script: Path, sbatch_args: list, script_args: list = (), **fd_env) -> str:
        env = dict(self.env)
        env.update({"FD_REPO": str(REPO), "FD_VENV": str(BIN.parent)})
        env.update({k: str(v) for k, v in fd_env.items()})
        r = self.run(["sbatch", "--parsable", *sbatch_args, script, *script_args], env=env, cwd=REPO)
        return r.stdout.strip().split(";")[0]

    def cancel_all(self, name: str | None = None, timeout: float = 30) -> None:
        """Cancel every job (of job name ``name``) until none is left (a running job may submit another)."""
        sel = [f"--name={name}"] if name else []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.run(["squeue", "-h", "-o", "%A", *sel], check=False)
            ids = sorted(set(r.stdout.split()))
            if r.returncode == 0 and not ids:
                return
            if ids:
                self.run(["scancel", *ids], check=False)
            time.sleep(0.5)

    def jobs(self, job: str) -> list[dict]:
        """``scontrol show job`` records (one per array task) as dicts."""
        r = self.run(["scontrol", "-o", "show", "job", job], check=False)
        return [dict(re.findall(r"(\S+?)=(\S*)", line)) for line in r.stdout.splitlines() if "JobId=" in line]

    def active(self, job: str) -> bool:
        r = self.run(["squeue", "-h", "-j", job, "-o", "%T"], check=False)
        return r.returncode == 0 and bool(r.stdout.strip())

    def wait(self, job: str, timeout: float, what: str = "") -> list[dict]:
        deadline = time.monotonic() + timeout
        while self.active(job):
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job} {what} still not finished after {timeout:.0f} s\n"
                                     f"{self.run(['squeue'], check=False).stdout}\n{self.job_logs()}")
            time.sleep(0.5)
        return self.jobs(job)

    def job_logs(self) -> str:
        return "\n".join(_tail(p, 60) for p in sorted(self.jobs_log.iterdir()))


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def slurm():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    base = Path(tempfile.mkdtemp(prefix="fd_slurm_", dir="/tmp"))
    cluster = LocalSlurm(base)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        if os.environ.get("FD_SLURM_KEEP") != "1":
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"\nSlurm test scratch kept: {base}")


class Reference:
    """Inputs shared by the tests and the labels of one uninterrupted single-process run (started at once in the
    background so it overlaps with the first Slurm job)."""

    def __init__(self, base: Path):
        self.base = base
        self.videos = base / "videos"
        thread = threading.Thread(target=make_videos, args=(self.videos, N_VIDEOS), kwargs={"seed": 11, "prefix": "sl"})
        thread.start()                                  # a subprocess, while this process builds the teacher
        self.teacher = make_teacher(base / "teacher")
        thread.join()
        assert (self.videos / "index.json").is_file(), "flowdistill synth failed"
        self.root = base / "ref"
        self._log = open(base / "ref.log", "w")
        cmd = label_cmd([self.videos], self.teacher, self.root, extra=ARGS[len(FAST):])
        self.proc = subprocess.Popen(cmd, env=clean_env(), cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT)
        self._content = None
        self._new = base / "new"                        # more videos, for refresh to find
        self._new_thread = threading.Thread(target=make_videos, args=(self._new, 2),
                                            kwargs={"seed": 12, "prefix": "nw"})
        self._new_thread.start()

    @property
    def new_videos(self) -> Path:
        self._new_thread.join()
        assert (self._new / "index.json").is_file(), "flowdistill synth failed"
        return self._new

    def content(self) -> dict:
        if self._content is None:
            rc = self.proc.wait(timeout=600)
            self._log.close()
            assert rc == 0, (self.base / "ref.log").read_text()
            self._content = content(self.root / "t" / "v0001")
            assert len(self._content) == 2 * N_VIDEOS
        return self._content

    def close(self) -> None:
        self._new_thread.join()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def ref(slurm):
    r = Reference(slurm.base / "data")
    try:
        yield r
    finally:
        r.close()


def fd_env(ref: Reference, root: Path, **extra) -> dict:
    """FD_* variables for a label job on the shared videos (the fast settings ARGS via FD_ARGS)."""
    return {"FD_SOURCES": str(ref.videos), "FD_SET": "t", "FD_ROOT": str(root), "FD_TEACHER": str(ref.teacher),
            "FD_ARGS": " ".join(ARGS), **extra}


def assert_complete(vdir: Path, units: int) -> dict:
    man = json.loads((vdir / "manifest.json").read_text())
    assert man["complete"] and man["units"] == {"total": units, "done": units, "failed": 0}, man["units"]
    assert (vdir.parent / "LATEST").read_text().strip() == vdir.name
    return man


def ledger_units(vdir: Path) -> list[str]:
    return [json.loads(line)["unit"] for p in sorted(vdir.glob("ledger-*.jsonl"))
            for line in p.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------ tests

def test_label_job_array_equals_single_process(slurm, ref):
    root = slurm.base / "array"
    job = slurm.sbatch(SLURM_DIR / "label.sbatch",
                       ["--array=0-2", "--cpus-per-task=1", f"--output={slurm.jobs_log}/%x-%A_%a.out"],
                       **fd_env(ref, root))
    recs = slurm.wait(job, 300, "(array)")
    assert sorted(r["ArrayTaskId"] for r in recs) == ["0", "1", "2"], recs
    assert all(r["JobState"] == "COMPLETED" and r["ExitCode"] == "0:0" for r in recs), slurm.job_logs()
    vdir = root / "t" / "v0001"
    assert_complete(vdir, N_VIDEOS)
    summaries = [json.loads((vdir / f"summary-{k}.json").read_text()) for k in range(3)]
    assert [(s["rank"], s["world"], s["launcher"]) for s in summaries] == [(k, 3, "slurm-array") for k in range(3)]
    assert content(vdir) == ref.content()


def test_label_multinode_srun_equals_single_process(slurm, ref):
    root = slurm.base / "multinode"
    job = slurm.sbatch(SLURM_DIR / "label_multinode.sbatch",
                       ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1",
                        f"--output={slurm.jobs_log}/%x-%j.out"],
                       **fd_env(ref, root))
    (rec,) = slurm.wait(job, 300, "(multinode)")
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", slurm.job_logs()
    assert rec["NumNodes"] == "2" and rec["NodeList"] == "127.0.0.[1-2]", rec
    vdir = root / "t" / "v0001"
    assert_complete(vdir, N_VIDEOS)
    summaries = [json.loads((vdir / f"summary-{k}.json").read_text()) for k in range(2)]
    assert [(s["rank"], s["world"], s["launcher"]) for s in summaries] == [(0, 2, "slurm"), (1, 2, "slurm")]
    assert content(vdir) == ref.content()


def test_label_job_stopped_twice_resumes_to_the_same_labels(slurm, ref):
    root = slurm.base / "requeue"
    vdir = root / "t" / "v0001"
    ledger = vdir / "ledger-0.jsonl"
    # one shard (one ledger line) per video, so "mid-way" is visible; ARGS go as script arguments here
    env = fd_env(ref, root, FD_ARGS="")
    job = slurm.sbatch(SLURM_DIR / "label.sbatch",
                       ["--array=0", "--cpus-per-task=1", f"--output={slurm.jobs_log}/%x-%A_%a.out"],
                       [*ARGS, "--set", "shard_samples=1"], **env)
    log = slurm.jobs_log / f"fd-label-{job}_0.out"

    def lines() -> int:
        return len(ledger.read_text().splitlines()) if ledger.exists() else 0

    def wait_mid_way(restarts: int, more_than: int) -> int:
        deadline = time.monotonic() + 180
        while True:
            (rec,) = slurm.jobs(job)
            n = lines()
            if (vdir / "manifest.json").exists() or rec["JobState"] in FINISHED:
                pytest.fail(f"the job finished before it could be interrupted (restarts {restarts}); "
                            f"make the work longer\n{slurm.job_logs()}")
            if rec["JobState"] == "RUNNING" and rec["Restarts"] == str(restarts) and n > more_than:
                return n
            assert time.monotonic() < deadline, f"no progress: {rec}\n{slurm.job_logs()}"
            time.sleep(0.1)

    # 1. as at the time limit: USR1 to the batch shell only (what --signal=B:USR1@120 sends); the script stops
    #    flowdistill (SIGTERM, exit 143) and requeues its own array task
    n1 = wait_mid_way(0, 0)
    slurm.run(["scancel", "--batch", "--signal=USR1", job])
    # 2. after the restart has made progress: an administrator / preemption requeue (SIGTERM to every process)
    n2 = wait_mid_way(1, n1)
    slurm.run(["scontrol", "requeue", job])
    (rec,) = slurm.wait(job, 300, "(requeued)")
    text = log.read_text()
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", text
    assert rec["Restarts"] == "2", rec
    assert "USR1 (time limit near)" in text and f"scontrol requeue {rec['JobId']}" in text, text
    assert "flowdistill exited 143" in text and "SIGTERM" in text, text
    assert [f"restart {k} " in text for k in range(3)] == [True] * 3, text
    assert 0 < n1 < n2 < N_VIDEOS, (n1, n2)
    units = ledger_units(vdir)
    assert len(units) == len(set(units)) == N_VIDEOS, units           # nothing twice, nothing missing
    assert_complete(vdir, N_VIDEOS)
    assert content(vdir) == ref.content()


def test_refresh_labels_new_videos_and_resubmits_itself(slurm, ref):
    ref.content()                                                    # the reference set is complete
    root = slurm.base / "refresh"
    shutil.copytree(ref.root, root)
    new = ref.new_videos
    name = "fd-refresh-test"
    env = fd_env(ref, root, FD_SOURCES=f"{ref.videos} {new}", FD_REFRESH_EVERY="4seconds",
                 FD_REFRESH_SBATCH_ARGS=f"--output={slurm.jobs_log}/%x-%j.out --cpus-per-task=1")
    first = slurm.sbatch(SLURM_DIR / "refresh.sbatch",
                         [f"--job-name={name}", "--cpus-per-task=1", f"--output={slurm.jobs_log}/%x-%j.out"], **env)
    log = slurm.jobs_log / f"{name}-{first}.out"
    try:
        deadline = time.monotonic() + 120
        while not (log.exists() and "next refresh is job" in log.read_text()):
            assert time.monotonic() < deadline and slurm.active(first), slurm.job_logs()
            time.sleep(0.2)
        second = re.search(r"next refresh is job (\d+)", log.read_text()).group(1)
        (nxt,) = slurm.jobs(second)                                 # while the first one still runs
        assert nxt["JobName"] == name and nxt["JobState"] == "PENDING", nxt
        assert nxt["Dependency"].startswith("singleton"), nxt
        (rec,) = slurm.wait(first, 300, "(refresh)")
        log1 = log.read_text()
        assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", log1
        assert f"units in sources: {N_VIDEOS + 2}; done {N_VIDEOS}" in log1 and "to label: 2" in log1, log1
        vdir = root / "t" / "v0001"
        assert_complete(vdir, N_VIDEOS + 2)
        got = content(vdir)
        old = ref.content()
        assert {k: got[k] for k in old} == old                      # old labels untouched
        assert len(got) == len(old) + 4                            # 2 new videos x 2 pairs
        # the resubmitted job runs after --begin, resubmits the next one, finds nothing to do
        (rec2,) = slurm.wait(second, 300, "(second refresh)")
        log2 = (slurm.jobs_log / f"{name}-{second}.out").read_text()
        assert rec2["JobState"] == "COMPLETED" and rec2["ExitCode"] == "0:0", log2
        assert "restart 0 " in log2 and "to label: 0" in log2, log2
        third = re.search(r"next refresh is job (\d+)", log2)
        assert third, log2
        (rec3,) = slurm.jobs(third.group(1))
        assert rec3["JobName"] == name and rec3["JobState"] in ("PENDING", "RUNNING"), rec3
        assert content(vdir) == got
    finally:
        slurm.cancel_all(name)                                      # end the chain
