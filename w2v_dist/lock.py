"""One run per ``output_dir``: a lease that names the run writing there, taken before anything else is
written.

``<output_dir>/.lock`` names its holder: host, pid (and the process's start time, so a recycled pid is not
the holder), SLURM job id and restart count, the launch (shared by every rank of one launch) and when it was
last renewed. Rank 0 takes it before the process group forms, and every rank stops with its refusal once the
group exists (a node that cannot see the lease has no shared output_dir:
:func:`~w2v_dist.dist.register_ranks`). A thread renews it every :data:`RENEW_SECONDS` from then on (through
the DeepSpeed op build, evaluations and saves, which no training step interrupts), and the process removes it
when it exits, normally or with an error.

A lease, not ``flock``: on NFS a lock dies with neither a crashed client nor a partitioned one (NFSv3 lockd
may keep it, NFSv4 drops it when the lease of the *client* expires, while the process may still be writing),
and on some cluster file systems ``flock`` is local to a node. The lease needs only what NFS makes atomic:
``link`` to create (it fails if the name exists) and ``rename`` to replace. It is stale, and taken over with
a warning, when:

- it was not renewed for ``trainer.lock_stale_minutes`` (default 5: ten missed renewals, well above NFS
  attribute caching (a minute at most) and the clock skew of NTP-synchronised nodes; a run killed on another
  host blocks its successor for at most that long);
- its holder ran on this host and that process is gone (a crash or a kill: taken over at once);
- it is held by an earlier incarnation of the same SLURM job (``SLURM_RESTART_COUNT`` higher here): the
  requeue.

Any other live holder makes the run stop at once, naming it. A holder that finds, when it renews, that its
lease names another run (it stalled for longer than the stale bound and was taken over) ends its process at
once: two runs must never write into one directory.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import psutil

from w2v_dist.dist import World, all_gather_objects

log = logging.getLogger("w2v_dist.lock")
LEASE_FILE = ".lock"
RENEW_SECONDS = 30.0
"""How often the holder renews its lease (more often when the stale bound is under ten times this)."""
SETTLE_SECONDS = 1.0
"""After replacing a stale lease: how long to wait before checking that no other contender replaced it
too."""


class OutputDirInUse(RuntimeError):
    """Another run that is alive holds ``output_dir``."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: float
    """The process's start time: a pid that was reused on the host is not the holder."""
    job: str | None
    """``SLURM_JOB_ID``, if any."""
    restart: int
    """``SLURM_RESTART_COUNT`` (0 for the first run of a job)."""
    launch: str
    """The same on every rank of one launch (:func:`launch_id`)."""
    renewed: float
    """``time.time()`` on the holder's host when it last renewed the lease."""

    @classmethod
    def this_process(cls) -> Holder:
        env = os.environ
        return cls(host=socket.gethostname(), pid=os.getpid(), started=psutil.Process().create_time(),
                   job=env.get("SLURM_JOB_ID"), restart=int(env.get("SLURM_RESTART_COUNT") or 0),
                   launch=launch_id(), renewed=time.time())

    def owns(self, lease: Holder | None) -> bool:
        return (lease is not None
                and (lease.host, lease.pid, lease.launch) == (self.host, self.pid, self.launch))

    def describe(self) -> str:
        job = f"SLURM job {self.job} (restart {self.restart})" if self.job else "no SLURM job"
        return (f"host {self.host}, pid {self.pid}, {job}, launch {self.launch}, last renewed "
                f"{time.time() - self.renewed:.0f} s ago")


def launch_id() -> str:
    """The same on every rank of one launch, and different for two launches that run at the same time: their
    rendezvous (``MASTER_ADDR:MASTER_PORT``, qualified by the host when it is a loopback address) cannot be
    the same, and neither can their SLURM job, step and restart."""
    env = os.environ
    addr = env.get("MASTER_ADDR", "")
    if addr in ("", "127.0.0.1", "localhost", "::1"):
        addr = f"{socket.gethostname()}/{addr or 'local'}"
    launch = f"{addr}:{env.get('MASTER_PORT', '')}"
    if env.get("SLURM_JOB_ID"):
        step = f".{env['SLURM_STEP_ID']}" if env.get("SLURM_STEP_ID") else ""
        launch += f" slurm {env['SLURM_JOB_ID']}{step} restart {env.get('SLURM_RESTART_COUNT') or 0}"
    return launch


def read_lease(path: Path) -> Holder | None:
    """The lease at ``path`` (``None``: there is none); ``ValueError`` if the file holds something else."""
    try:
        record = json.loads(path.read_text())
        return Holder(**{f.name: record[f.name] for f in fields(Holder)})  # a later version may record more
    except FileNotFoundError:
        return None
    except (TypeError, KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a lease: {err}") from None


def takeover_reason(lease: Holder, me: Holder, stale_seconds: float) -> str | None:
    """Why ``me`` may take over ``lease``, or ``None`` when its holder counts as alive."""
    if lease.launch == me.launch:
        return "it names this launch"
    if lease.job is not None and lease.job == me.job and me.restart > lease.restart:
        return (f"SLURM job {me.job} was requeued (restart {lease.restart} held it, this is restart "
                f"{me.restart})")
    age = time.time() - lease.renewed
    if age > stale_seconds:
        return (f"it was last renewed {age:.0f} s ago (stale after {stale_seconds:.0f} s: "
                f"trainer.lock_stale_minutes)")
    if lease.host == me.host and not _alive(lease):
        return f"its process {lease.pid} on this host is gone"
    return None


def _alive(holder: Holder) -> bool:
    try:
        process = psutil.Process(holder.pid)
        return process.status() != psutil.STATUS_ZOMBIE and abs(process.create_time() - holder.started) < 1.0
    except psutil.NoSuchProcess:
        return False


class OutputDirLock:
    """The lease on ``directory`` for this process's run (:meth:`claim`, :meth:`agree`); stale after
    ``stale_seconds``."""

    def __init__(self, directory: Path, stale_seconds: float) -> None:
        self.path = directory / LEASE_FILE
        self.stale_seconds = stale_seconds
        self.renew_seconds = min(RENEW_SECONDS, stale_seconds / 10)
        self.me: Holder | None = None
        self._stop = threading.Event()

    def claim(self, world: World) -> str | None:
        """Before the process group forms: rank 0 takes the lease (:meth:`take`) and returns its refusal
        instead of raising it (``None``: it holds the lease); every other rank returns ``None`` at once. A
        rank other than 0 does not look at the lease: on a node where output_dir is not the shared directory
        it never would see it, and :func:`~w2v_dist.dist.register_ranks` stops that run with the reason."""
        if not world.is_main:
            return None
        try:
            self.take()
        except OutputDirInUse as err:
            return str(err)
        return None

    @staticmethod
    def agree(refusal: str | None) -> None:
        """Collective, once the process group exists: every rank raises rank 0's refusal (:meth:`claim`), if
        any, so that no rank of a refused run goes on or waits for the others."""
        refusal = all_gather_objects(refusal)[0]
        if refusal:
            raise OutputDirInUse(refusal)

    def take(self) -> None:
        """Hold the lease from now until the process exits, renewed by a thread; or raise
        :class:`OutputDirInUse` naming the live run that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = Holder.this_process()
        while not self._create(me):
            lease: Holder | None = None
            try:
                lease = read_lease(self.path)
            except ValueError as err:
                reason: str | None = str(err)
            else:
                if lease is None:  # released since: try again
                    continue
                reason = takeover_reason(lease, me, self.stale_seconds)
                if reason is None:
                    raise OutputDirInUse(self.refusal(lease))
            log.warning("taking over the lock of %s from %s: %s", self.path.parent,
                        lease.describe() if lease else "an unreadable lease", reason)
            self._replace(me)
            time.sleep(SETTLE_SECONDS)  # a contender that judged the same stale lease at the same moment
            winner = read_lease(self.path)
            if not me.owns(winner):
                raise OutputDirInUse(self.refusal(winner) if winner
                                     else f"lost the lock of {self.path.parent}")
            break
        self.me = me
        threading.Thread(target=self._keep, name="w2v-dist-lock", daemon=True).start()
        atexit.register(self.release)

    def refusal(self, lease: Holder) -> str:
        return (f"output_dir {self.path.parent} is in use by another run: {lease.describe()}. Its lease "
                f"({self.path}) becomes stale {self.stale_seconds / 60:g} min after its last renewal "
                f"(trainer.lock_stale_minutes); a crashed holder on the same host, or an earlier run of the "
                f"same SLURM job, is taken over at once. Give this run another output_dir, or stop that "
                f"run; delete the lease only if that run is surely gone")

    def release(self) -> None:
        """Stop renewing and remove the lease if it is still this process's (at exit; also on an error)."""
        if self.me is None or self.me.pid != os.getpid():  # not taken, released already, or a forked child
            return
        self._stop.set()
        try:
            if self.me.owns(read_lease(self.path)):
                self.path.unlink()
        except (OSError, ValueError) as err:
            log.warning("could not remove the lock %s: %s", self.path, err)
        self.me = None

    def _keep(self) -> None:
        while not self._stop.wait(self.renew_seconds):
            try:
                self.renew()
            except (OSError, ValueError) as err:  # an unreachable file server: keep trying
                log.warning("could not renew the lock %s: %s", self.path, err)

    def renew(self) -> None:
        """Rewrite the lease with a new time, if it is still ours; if another run took it over, end this
        process (before anything more of this run is written where that one writes)."""
        assert self.me is not None
        try:
            lease = read_lease(self.path)
        except ValueError:  # overwritten by hand with something else: nobody's, so still ours
            lease = self.me
        if lease is None:  # deleted by hand: ours again, unless another run took it since
            if self._create(self.me):
                return
            lease = read_lease(self.path)
        if not self.me.owns(lease):
            self._lost(lease)
            return
        self.me = replace(self.me, renewed=time.time())
        self._replace(self.me)

    def _lost(self, lease: Holder | None) -> None:
        log.critical("another run took over %s (%s) while this one held it; stopping this process now so "
                     "that the two never write there together", self.path.parent,
                     lease.describe() if lease else "the lease was removed")
        logging.shutdown()
        os._exit(1)

    def _tmp(self, me: Holder) -> Path:
        tmp = self.path.with_name(f"{LEASE_FILE}.{me.host}.{me.pid}.tmp")
        tmp.write_text(json.dumps(asdict(me)))
        return tmp

    def _create(self, me: Holder) -> bool:
        """Create the lease if there is none: ``link`` fails on an existing name, atomically, NFS
        included."""
        tmp = self._tmp(me)
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return tmp.stat().st_nlink == 2  # NFS: a retried LINK whose first reply was lost says EEXIST
        except OSError:  # a file system without hard links: create by rename, checked like a takeover
            if self.path.exists():
                return False
            tmp.replace(self.path)
            time.sleep(SETTLE_SECONDS)
            return me.owns(read_lease(self.path))
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def _replace(self, me: Holder) -> None:
        self._tmp(me).replace(self.path)
