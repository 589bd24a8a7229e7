"""A real single-node SLURM cluster on localhost, for tests that submit real jobs through sbatch.

Everything lives under one work folder: munged (own key + socket), slurmctld, slurmd and, with
accounting on, slurmdbd + a private MariaDB server; no file under /etc is read or written. Client
commands (sbatch, squeue, sacct, scancel, ...) find the cluster through the SLURM_CONF environment
variable, which `start_local_slurm` exports into os.environ (and `stop` restores), so code that
shells out to sbatch -- e.g. submitit -- talks to this cluster without knowing about it.

Needs (Debian 12, as root):
  apt-get install -y --no-install-recommends munge slurmctld slurmd slurm-client
  # for `sacct` (submitit polls job states with sacct):
  apt-get install -y --no-install-recommends slurmdbd slurm-wlm-mysql-plugin mariadb-server-core mariadb-client-core
  (.ci/slurm/install.sh does both.)  Without accounting, `sacct` fails with "Slurm accounting storage is
  disabled", submitit then reports every job as UNKNOWN and waits forever on a job that dies without
  writing its result (scancel, OOM, node failure).

    from tests.helpers.slurm import start_local_slurm, slurm_available
    with start_local_slurm(tmp_path / "slurm") as cluster:   # or handle = start_local_slurm(...); handle.stop()
        subprocess.run(["sbatch", "--wrap", "true"], check=True)   # SLURM_CONF already exported
"""
from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo", "scontrol")
ACCOUNTING_BINARIES = ("slurmdbd", "sacct", "sacctmgr", "mariadbd", "mariadb-install-db")
PARTITION = "debug"
# slurmdbd recommends a 1G pool and 64M log; 64M log is kept, the pool stays small (a warning in slurmdbd.log).
INNODB = ("--innodb-buffer-pool-size=128M", "--innodb-log-file-size=64M", "--innodb-lock-wait-timeout=900")
CLUSTER = "lkci"


def slurm_available(accounting: bool = True) -> str | None:
    """None when a local cluster can be started here, else why not (for pytest.skip)."""
    if os.geteuid() != 0:
        return "a local SLURM cluster needs root (slurmd runs jobs as their submitting user)"
    missing = [b for b in SLURM_BINARIES + (ACCOUNTING_BINARIES if accounting else ()) if not _which(b)]
    if missing:
        return f"missing SLURM binaries {missing}: apt-get install munge slurmctld slurmd slurm-client" + (
            " slurmdbd slurm-wlm-mysql-plugin mariadb-server-core mariadb-client-core" if accounting else "")
    return None


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_config() -> dict[str, str]:
    """`slurmd -C`'s first line as a dict: NodeName, CPUs, Boards, SocketsPerBoard, ..., RealMemory."""
    out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    return dict(kv.split("=", 1) for kv in out.splitlines()[0].split())


@dataclass
class LocalSlurm:
    workdir: Path
    conf: Path
    env: dict[str, str]                      # os.environ + SLURM_CONF, for subprocesses
    node: str
    partition: str
    accounting: bool
    sockdir: Path | None = None              # short /tmp folder for the unix sockets
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    _saved_slurm_conf: str | None = None
    _exported: bool = False

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Runs a SLURM client command against this cluster; text output."""
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, check=check, timeout=timeout)

    def job_states(self, job_id: str) -> list[str]:
        """JobState of a job (one per array task) from `scontrol show job`, e.g. ["COMPLETED"]; [] once forgotten."""
        out = self.run("scontrol", "show", "job", str(job_id), check=False).stdout
        return [line.split("JobState=", 1)[1].split()[0] for line in out.splitlines() if "JobState=" in line]

    def restarts(self, job_id: str) -> int:
        """How many times SLURM has requeued the job (`scontrol show job`'s Restarts); 0 once forgotten."""
        out = self.run("scontrol", "show", "job", str(job_id), check=False).stdout
        return max((int(n) for n in re.findall(r"\bRestarts=(\d+)", out)), default=0)

    def wait_job(self, job_id: str, timeout: float = 120) -> list[str]:
        """Polls until no task of the job is PENDING/CONFIGURING/RUNNING/COMPLETING; returns the final states."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = self.job_states(job_id)
            if states and not set(states) & {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED"}:
                return states
            time.sleep(0.1)
        raise TimeoutError(f"job {job_id} still {self.job_states(job_id)} after {timeout}s\n{self.logs()}")

    def logs(self) -> str:
        """The tails of every daemon's log, for assertion messages."""
        parts = []
        for log in sorted((self.workdir / "log").glob("*.log")):
            parts.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancels every job, stops the daemons (slurmd, slurmctld, slurmdbd, mariadb, munged), restores SLURM_CONF."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--partition", self.partition], env=self.env, capture_output=True, timeout=30)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                q = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True,
                                   timeout=30)
                if q.returncode != 0 or not q.stdout.strip():
                    break
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "slurmdbd", "mariadb", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self.sockdir is not None:
            shutil.rmtree(self.sockdir, ignore_errors=True)
            self.sockdir = None
        if self._exported:
            if self._saved_slurm_conf is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = self._saved_slurm_conf
            self._exported = False

    def __enter__(self) -> "LocalSlurm":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _spawn(handle: LocalSlurm, name: str, cmd: list[str]) -> subprocess.Popen:
    out = open(handle.workdir / "log" / f"{name}.out", "ab")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=handle.env, start_new_session=True)
    out.close()
    handle.procs[name] = proc
    return proc


def _wait_for(what: str, check, handle: LocalSlurm, timeout: float, proc_names=()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for n in proc_names:
            if handle.procs[n].poll() is not None:
                raise RuntimeError(f"{n} exited with {handle.procs[n].returncode} while waiting for {what}\n"
                                   + handle.logs() + _tail(handle.workdir / "log" / f"{n}.out"))
        if check():
            return
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}\n{handle.logs()}")


def _tail(path: Path) -> str:
    return f"\n--- {path.name}\n" + path.read_text(errors="replace")[-3000:] if path.exists() else ""


def _ok(cmd: list[str], env: dict[str, str]) -> bool:
    return subprocess.run(cmd, env=env, capture_output=True, timeout=30).returncode == 0


def start_local_slurm(workdir: str | os.PathLike, *, accounting: bool = True, export_env: bool = True,
                      timeout: float = 90) -> LocalSlurm:
    """Starts munged, [mariadb + slurmdbd,] slurmctld and slurmd under `workdir`; returns once the node is idle.

    accounting: also start slurmdbd over a private MariaDB, so `sacct` works (submitit needs it to see
        jobs that end without a result, e.g. cancelled ones); False skips both (~10 s faster start).
    export_env: put SLURM_CONF into os.environ until stop(), so plain `sbatch`/submitit use this cluster.
    """
    if (why := slurm_available(accounting)) is not None:
        raise RuntimeError(why)
    workdir = Path(workdir).resolve()
    # AF_UNIX socket paths are limited to 107 bytes: keep the sockets in a short private folder.
    sockdir = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
    os.chmod(sockdir, 0o755)
    hostname = socket.gethostname().split(".")[0]
    for sub in ("log", "state", f"spool/{hostname}", "munge", "db"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(workdir / "munge", 0o700)
    node = node_config()
    user = pwd.getpwuid(os.getuid()).pw_name
    conf = workdir / "slurm.conf"
    env = dict(os.environ, SLURM_CONF=str(conf))
    env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
    handle = LocalSlurm(workdir=workdir, conf=conf, env=env, node=hostname, partition=PARTITION, accounting=accounting,
                        sockdir=sockdir)
    try:
        # --- munge: own key, socket, pid, log, seed
        key = workdir / "munge" / "munge.key"
        if not key.exists():
            subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
        os.chmod(key, 0o600)
        munge_socket = sockdir / "munge.socket"
        _spawn(handle, "munged", ["munged", "--foreground", "--force", f"--socket={munge_socket}",
                                  f"--key-file={key}", f"--pid-file={workdir / 'munge' / 'munged.pid'}",
                                  f"--log-file={workdir / 'log' / 'munged.log'}",
                                  f"--seed-file={workdir / 'munge' / 'munged.seed'}"])
        _wait_for("munged", lambda: munge_socket.exists() and _ok(
            ["sh", "-c", f"munge -S {munge_socket} -n | unmunge -S {munge_socket}"], env), handle, timeout, ["munged"])

        dbd_port = _free_port()
        if accounting:
            _start_accounting(handle, sockdir, munge_socket, dbd_port, user, timeout)

        conf.write_text(SLURM_CONF_TEMPLATE.format(
            cluster=CLUSTER, host=hostname, user=user, munge_socket=munge_socket,
            ctld_port=_free_port(), slurmd_port=_free_port(), workdir=workdir, partition=PARTITION,
            cpus=node["CPUs"], boards=node.get("Boards", 1), sockets=node.get("SocketsPerBoard", 1),
            cores=node.get("CoresPerSocket", 1), threads=node.get("ThreadsPerCore", 1),
            memory=node["RealMemory"],
            accounting=(f"AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=localhost\n"
                        f"AccountingStoragePort={dbd_port}\n"
                        # the munge socket for talking to slurmdbd is AccountingStoragePass, not AuthInfo
                        f"AccountingStoragePass={munge_socket}\n" if accounting
                        else "AccountingStorageType=accounting_storage/none\n")))
        _spawn(handle, "slurmctld", ["slurmctld", "-D", "-f", str(conf)])
        _wait_for("slurmctld", lambda: _ok(["scontrol", "ping"], env), handle, timeout, ["slurmctld"])
        _spawn(handle, "slurmd", ["slurmd", "-D", "-f", str(conf), "-N", hostname])

        def idle() -> bool:
            r = subprocess.run(["sinfo", "-h", "-N", "-n", hostname, "-o", "%T"], env=env, capture_output=True,
                               text=True, timeout=30)
            return r.returncode == 0 and r.stdout.strip() == "idle"
        _wait_for(f"node {hostname} idle", idle, handle, timeout, ["slurmctld", "slurmd"])
    except BaseException:
        handle.stop()
        raise
    if export_env:
        handle._saved_slurm_conf = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = str(conf)
        handle._exported = True
    return handle


def _start_accounting(handle: LocalSlurm, sockdir: Path, munge_socket: Path, dbd_port: int, user: str,
                      timeout: float) -> None:
    """A private MariaDB on 127.0.0.1:<free port> and slurmdbd on it (slurmctld registers the cluster itself)."""
    workdir, env = handle.workdir, handle.env
    datadir = workdir / "db" / "data"
    db_socket, db_port = sockdir / "mysql.sock", _free_port()
    if not (datadir / "mysql").exists():
        subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={datadir}", "--user=root",
                        "--auth-root-authentication-method=socket", "--skip-test-db", *INNODB],
                       check=True, capture_output=True, timeout=timeout)
    _spawn(handle, "mariadb", ["mariadbd", "--no-defaults", f"--datadir={datadir}", "--user=root",
                               f"--socket={db_socket}", "--bind-address=127.0.0.1", f"--port={db_port}",
                               f"--pid-file={workdir / 'db' / 'mariadb.pid'}",
                               f"--log-error={workdir / 'log' / 'mariadb.log'}", "--skip-log-bin",
                               *INNODB, "--performance-schema=OFF"])
    sql = ["mariadb", "--no-defaults", f"--socket={db_socket}", "-uroot"]
    _wait_for("mariadb", lambda: _ok(sql + ["-e", "select 1"], env), handle, timeout, ["mariadb"])
    subprocess.run(sql + ["-e", "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';"
                                "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"],
                   check=True, capture_output=True, timeout=30)
    dbd_conf = workdir / "slurmdbd.conf"     # slurmdbd reads it from SLURM_CONF's folder
    dbd_conf.write_text(SLURMDBD_CONF_TEMPLATE.format(munge_socket=munge_socket, port=dbd_port, user=user,
                                                      workdir=workdir, db_port=db_port))
    os.chmod(dbd_conf, 0o600)   # slurmdbd refuses a config others can read
    _spawn(handle, "slurmdbd", ["slurmdbd", "-D"])
    _wait_for("slurmdbd", lambda: _port_open(dbd_port), handle, timeout, ["slurmdbd"])


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


# Single node named after `hostname -s`, with slurmd -C's CPUs/memory; no cgroups, no job accounting gather.
SLURM_CONF_TEMPLATE = """\
ClusterName={cluster}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser={user}
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
StateSaveLocation={workdir}/state
SlurmdSpoolDir={workdir}/spool/%n
SlurmctldPidFile={workdir}/state/slurmctld.pid
SlurmdPidFile={workdir}/spool/slurmd.pid
SlurmctldLogFile={workdir}/log/slurmctld.log
SlurmdLogFile={workdir}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
{accounting}JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
ReturnToService=2
KillWait=5
MinJobAge=300
InactiveLimit=0
Waittime=0
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} Boards={boards} SocketsPerBoard={sockets} CoresPerSocket={cores} ThreadsPerCore={threads} RealMemory={memory} State=UNKNOWN
PartitionName={partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""

SLURMDBD_CONF_TEMPLATE = """\
AuthType=auth/munge
AuthInfo=socket={munge_socket}
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={port}
SlurmUser={user}
PidFile={workdir}/db/slurmdbd.pid
LogFile={workdir}/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={db_port}
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=slurm
"""
