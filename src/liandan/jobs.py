"""Training jobs that outlive the page that started them: the server side of `liandan ui`'s Train tab.

    from pathlib import Path
    from liandan.jobs import Jobs, cli_command

    jobs = Jobs(Path("~/.cache/liandan/ui").expanduser())
    recipe = {"data": ["examples/pirate.jsonl"], "max_steps": 30}
    print(cli_command("sft", recipe, "runs/pirate"))
    # liandan sft -o runs/pirate --set 'data=["examples/pirate.jsonl"]' --set max_steps=30
    job = jobs.start("sft", recipe, "runs/pirate")     # python -m liandan sft --config ... -o runs/pirate
    jobs.progress(job.id)["step"]                       # from runs/pirate/progress.json
    jobs.stop(job.id)                                   # SIGTERM: it stops after its step, with a checkpoint
    jobs.resume(job.id)                                 # python -m liandan sft --resume -o runs/pirate: the same job

A job is an ordinary ``liandan <stage>`` process started in a session of its own (so it outlives
the UI, and the UI's Ctrl-C does not reach it) writing an ordinary run directory. Nothing about
it lives only in memory: ``ROOT/<id>/job.json`` holds its command, process id and the process's
start time, with ``recipe.yaml`` and ``log.txt`` (its stdout and stderr) beside it; the run
directory holds ``progress.json``, ``metrics.jsonl`` and, for GRPO, ``completions.jsonl``. So a
refreshed page, a second tab or a restarted UI (a new `Jobs` on the same root) finds every job
again, with its status read afresh each time:

- running, or stopping once asked to stop: its process is alive (the same process: its start time
  is compared, so a process id the system has handed to another program does not count);
- finished, stopped or failed: what the run's process wrote last in progress.json;
- failed also when the process is gone without saying how it ended (killed, out of memory): the
  end of its log says why.

A job's id comes from its run directory, so one directory is one job; a second start into a
directory that a running job (or a ``liandan`` command) is training is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

from .checkpoints import PROGRESS, latest_checkpoint
from .config import STAGES, build, parse_value, to_dict
from .errors import LiandanError, say
from .files import write_atomic

ACTIVE = ("running", "stopping")
ENDED = ("finished", "stopped", "failed")


@dataclass
class Job:
    id: str
    """From the run directory: its name and a hash of its resolved path."""
    stage: str
    """sft, dpo, pretrain or grpo."""
    run_dir: Path
    command: list[str]
    """The argv of the job's latest process (start, then each resume); [] for a run found on disk."""
    status: str
    """running, stopping, stopped, finished or failed (see the module docstring)."""
    pid: int | None
    started: float
    """When the job was first started (seconds since the epoch)."""
    log_path: Path
    """The process's stdout and stderr, every start and resume one after the other."""
    cwd: str = ""
    """The directory the job runs in: relative paths in its recipe mean the same on resume."""
    process_start: int | None = None
    """The process's start time in clock ticks after boot (Linux), telling it from a later process with its id."""
    stop_requested: bool = False
    """A stop was asked for: a process gone without a final status is then stopped, not failed."""


class Jobs:
    """Every job under one state directory ``root`` (the UI chooses it, e.g. ~/.cache/liandan/ui).
    Safe to share between the threads of one process (a web server's requests)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self.children: dict[int, subprocess.Popen] = {}  # started here: polled, so none is left a zombie
        self.lock = threading.Lock()  # two clicks on Start must not launch two processes into one directory

    def start(self, stage: str, recipe: dict, output_dir: str | Path, *, allow_code: bool = False) -> Job:
        """Check ``recipe`` (the stage's settings, as in its YAML) and launch the run into
        ``output_dir``, which must be empty or new. ``allow_code`` lets python= rewards and
        predicates run (``--allow-code``)."""
        config_class = stage_config(stage)
        run_dir = Path(output_dir).expanduser().resolve()
        recipe = {**recipe, "output_dir": str(run_dir)}
        config = build(config_class, recipe, "")  # a bad setting is an error here, not a process that dies at once
        if not config.data:
            raise LiandanError("no training data: give data: [FILE, ...] in the recipe")
        for path in [*config.data, *config.eval_data]:
            if not Path(path).is_file():
                raise LiandanError(f"data file '{path}' does not exist")
        with self.lock:
            self.refuse_busy(run_dir)
            if run_dir.exists() and any(run_dir.iterdir()):
                raise LiandanError(f"output directory '{run_dir}' is not empty; resume its job, or choose another one")
            job_id = job_id_for(run_dir)
            folder = self.root / job_id
            folder.mkdir(parents=True, exist_ok=True)
            write_atomic(folder / "recipe.yaml", yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True))
            command = [sys.executable, "-m", "liandan", stage, "--config", str(folder / "recipe.yaml"), "-o", str(run_dir)]
            job = Job(id=job_id, stage=stage, run_dir=run_dir, command=command + ["--allow-code"] * allow_code,
                      status="running", pid=None, started=time.time(), log_path=folder / "log.txt", cwd=os.getcwd())  # fmt: skip
            job.log_path.unlink(missing_ok=True)  # a job of the same directory, emptied since
            return self.launch(job)

    def list(self, folders: Iterable[str | Path] = ()) -> list[Job]:
        """Every known job, newest first, its status read afresh; with ``folders``, also the runs
        directly inside them that have a progress.json (runs started by a ``liandan`` command),
        which become jobs from then on."""
        jobs = []
        for path in sorted(self.root.glob("*/job.json")):
            try:
                jobs.append(self.refresh(self.load(path.parent.name)))
            except LiandanError as exc:  # one unreadable file must not hide the others
                say(str(exc))
        known = {job.run_dir for job in jobs}
        for folder in folders:
            for found in sorted(Path(folder).expanduser().glob(f"*/{PROGRESS}")):
                run_dir = found.parent.resolve()
                if run_dir not in known and (job := self.adopt(run_dir)) is not None:
                    jobs.append(job)
                    known.add(run_dir)
        return sorted(jobs, key=lambda job: job.started, reverse=True)

    def get(self, job_id: str) -> Job:
        return self.refresh(self.load(job_id))

    def stop(self, job_id: str, *, abort: bool = False) -> Job:
        """Ask the job's process to stop (SIGTERM): it finishes its step, writes a checkpoint and
        exits; the job is "stopping" until then. A second call does nothing, unless ``abort``:
        then a second SIGTERM ends the process at once (its last checkpoint is kept)."""
        with self.lock:
            job = self.get(job_id)
            if job.status not in ACTIVE:
                raise LiandanError(f"job {job_id} is not running (it is {job.status})")
            if job.status == "stopping" and not abort:
                return job
            try:
                os.kill(job.pid, signal.SIGTERM)
            except ProcessLookupError:  # it ended meanwhile
                return self.get(job_id)
            job.stop_requested, job.status = True, "stopping"
            self.save(job)
            return job

    def resume(self, job_id: str) -> Job:
        """Continue a stopped or failed job from its last checkpoint: ``liandan <stage> --resume``
        into the same run directory, as the same job."""
        with self.lock:
            job = self.get(job_id)
            if job.status in ACTIVE:
                raise LiandanError(f"job {job_id} is still {job.status}; stop it before resuming it")
            if job.status == "finished":
                raise LiandanError(f"job {job_id} has finished: its model is in '{job.run_dir}'")
            if latest_checkpoint(job.run_dir, quiet=True) is None:
                raise LiandanError(f"job {job_id} has no complete checkpoint in '{job.run_dir}' to resume from; "
                                   "start it again into an empty output directory")  # fmt: skip
            self.refuse_busy(job.run_dir)
            flags = ["--allow-code"] if "--allow-code" in job.command else []
            job.command = [sys.executable, "-m", "liandan", job.stage, "--resume", "-o", str(job.run_dir), *flags]
            return self.launch(job)

    def progress(self, job_id: str, log_lines: int = 20) -> dict:
        """What the page shows: progress.json's step, steps, seconds and ETA (None while none is
        known), the job's status, the loss curve ``loss`` and ``eval_loss`` as [(step, value)],
        the last metrics record ``last``, GRPO's latest round of completions ``completions``, and
        the last ``log_lines`` of the log ``log``."""
        job = self.get(job_id)
        record = read_json(job.run_dir / PROGRESS) or {}
        current = record.get("pid") == job.pid  # not the record of an earlier process of the job
        metrics = read_jsonl(job.run_dir / "metrics.jsonl")
        completions = read_jsonl(job.run_dir / "completions.jsonl")
        return {
            "stage": job.stage,
            "status": job.status,
            "step": record.get("step", 0),
            "steps": record.get("steps"),
            "seconds": record.get("seconds", 0.0),
            "eta_seconds": record.get("eta_seconds") if current and job.status in ACTIVE else None,
            "loss": curve(metrics, "loss"),
            "eval_loss": curve(metrics, "eval_loss"),
            "last": metrics[-1] if metrics else None,
            "completions": [c for c in completions if c.get("step") == completions[-1].get("step")] if completions else [],
            "log": tail(job.log_path, log_lines),
        }

    # -----------------------------------------------------------------------------------------

    def launch(self, job: Job) -> Job:
        """Start the job's command, detached, its output appended to its log."""
        job.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(job.log_path, "ab") as log:
            log.write(f"$ {shlex.join(job.command)}\n".encode())
            log.flush()
            child = subprocess.Popen(job.command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     cwd=job.cwd or None, start_new_session=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
        self.children[child.pid] = child
        job.pid, job.process_start = child.pid, process_start(child.pid)
        job.status, job.stop_requested = "running", False
        self.save(job)
        return job

    def refresh(self, job: Job) -> Job:
        """The job's status now. Only a running job changes by itself; an ended one is final
        until it is resumed, and saved as such once seen."""
        if job.status not in ACTIVE:
            return job
        record = read_json(job.run_dir / PROGRESS) or {}
        said = record.get("status") if record.get("pid") == job.pid else None
        if self.alive(job):
            job.status = "stopping" if job.stop_requested or said == "stopping" else "running"
            return job
        job.status = said if said in ENDED else "stopped" if job.stop_requested else "failed"
        self.save(job)
        return job

    def alive(self, job: Job) -> bool:
        child = self.children.get(job.pid)
        if child is not None and child.poll() is not None:
            del self.children[job.pid]
            return False
        return process_alive(job.pid, job.process_start)

    def refuse_busy(self, run_dir: Path) -> None:
        """Refuse a run directory that a job, or a ``liandan`` command, is training now."""
        path = self.root / job_id_for(run_dir) / "job.json"
        if path.is_file() and (job := self.get(job_id_for(run_dir))).status in ACTIVE:
            raise LiandanError(f"'{run_dir}' is in use by {job.status} job {job.id} (process {job.pid}); "
                               "stop it first, or choose another output directory")  # fmt: skip
        record = read_json(run_dir / PROGRESS) or {}
        if record.get("status") in ACTIVE and process_alive(record.get("pid"), None):
            raise LiandanError(f"'{run_dir}' is in use by a running liandan process ({record['pid']}); "
                               "stop it first, or choose another output directory")  # fmt: skip

    def adopt(self, run_dir: Path) -> Job | None:
        """A run directory found on disk, as a job (None if its progress.json is not a run's)."""
        record = read_json(run_dir / PROGRESS) or {}
        status, pid = record.get("status"), record.get("pid")
        if record.get("stage") not in STAGES or status not in ACTIVE + ENDED:
            return None
        alive = status in ACTIVE and process_alive(pid, None)
        job = Job(id=job_id_for(run_dir), stage=record["stage"], run_dir=run_dir, command=[],
                  status=status if alive or status in ENDED else "failed", pid=pid,
                  started=(run_dir / PROGRESS).stat().st_mtime - float(record.get("seconds") or 0),
                  log_path=self.root / job_id_for(run_dir) / "log.txt",
                  process_start=process_start(pid) if alive else None)  # fmt: skip
        self.save(job)
        return job

    def load(self, job_id: str) -> Job:
        if not re.fullmatch(r"[\w.-]+", job_id) or job_id.strip(".") == "":
            raise LiandanError(f"{job_id!r} is not a job id")
        path = self.root / job_id / "job.json"
        if not path.is_file():
            raise LiandanError(f"no job {job_id!r} in '{self.root}'")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            job = Job(**{f.name: data[f.name] for f in dataclasses.fields(Job) if f.name in data})
        except (ValueError, TypeError) as exc:
            raise LiandanError(f"{path}: not a job record: {exc}") from None
        job.run_dir, job.log_path = Path(job.run_dir), Path(job.log_path)
        return job

    def save(self, job: Job) -> None:
        record = {**dataclasses.asdict(job), "run_dir": str(job.run_dir), "log_path": str(job.log_path)}
        (self.root / job.id).mkdir(parents=True, exist_ok=True)
        write_atomic(self.root / job.id / "job.json", json.dumps(record, indent=1) + "\n")


def cli_command(stage: str, recipe: dict, output_dir: str | Path, *, allow_code: bool = False) -> str:
    """The one-line shell command that runs ``recipe`` as the UI would: ``liandan <stage> -o DIR``
    and a ``--set key=value`` for each setting that differs from the stage's default (checked
    first, as `Jobs.start` checks it)."""
    config_class = stage_config(stage)
    settings = flatten(to_dict(build(config_class, {**recipe, "output_dir": str(output_dir)}, "")))
    defaults = flatten(to_dict(config_class()))
    words = ["liandan", stage, "-o", str(output_dir)]
    for key, value in settings.items():
        if key != "output_dir" and value != defaults.get(key):
            words += ["--set", f"{key}={set_value(value)}"]
    return shlex.join(words + ["--allow-code"] * allow_code)


def stage_config(stage: str) -> type:
    if stage not in STAGES:
        raise LiandanError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    return STAGES[stage]


def job_id_for(run_dir: Path) -> str:
    """The run directory's name (made safe for a file name) and a short hash of its whole path."""
    name = re.sub(r"[^\w.-]+", "_", run_dir.name).strip(".") or "run"
    return f"{name}-{hashlib.sha256(str(run_dir).encode()).hexdigest()[:8]}"


def flatten(settings: dict, prefix: str = "") -> dict:
    """Nested settings as the dotted keys --set takes: {"lora": {"rank": 8}} -> {"lora.rank": 8}."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def set_value(value) -> str:
    """A value as --set reads it back (`liandan.config.parse_value`): a plain string as it is
    where that reads back the same, anything else as JSON (which YAML reads too)."""
    if isinstance(value, str) and parse_value(value) == value:
        return value
    return json.dumps(value, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------
# Processes and files


def proc_stat(pid: int | None) -> tuple[str, int] | None:
    """The process's state (R, S, Z, ...) and start time in clock ticks after boot, from Linux's
    /proc; None when there is no such process, or no /proc."""
    try:
        fields = Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])  # fields 3 and 22 of stat (the name before ")" may hold spaces)
    except (OSError, IndexError, ValueError, TypeError):
        return None


def process_start(pid: int | None) -> int | None:
    stat = proc_stat(pid)
    return stat[1] if stat else None


def process_alive(pid: int | None, started: int | None) -> bool:
    """Whether process ``pid`` runs, and is the one that started at ``started`` (when known)."""
    if not pid:
        return False
    stat = proc_stat(pid)
    if stat is not None:
        state, start = stat
        if started is not None and start != started:  # the id belongs to a later process now
            return False
        if state != "Z":
            return True
        reap(pid)  # a zombie: it has ended
        return False
    if Path("/proc/self/stat").is_file() or reap(pid):  # Linux and no such process; or our child, ended
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        pass
    return True


def reap(pid: int) -> bool:
    """Collect a child of this process that has ended (else it lingers as a zombie)."""
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:
        return False


def read_json(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file a run is appending to; a line torn mid-write is left out."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            pass
    return [r for r in records if isinstance(r, dict)]


def curve(metrics: list[dict], key: str) -> list[tuple[int, float]]:
    return [(m["step"], m[key]) for m in metrics if isinstance(m.get(key), (int, float)) and "step" in m]


def tail(path: Path, lines: int) -> str:
    """The last ``lines`` lines of a log (read from its end: a log may be long)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 64 * 1024))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.replace("\r", "\n").splitlines()[-lines:])
