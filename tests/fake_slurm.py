"""A stand-in for Slurm's sbatch, srun and sacct on one machine, so that `--launcher slurm` runs
end to end in tests: sbatch starts every task of a job array at once as a local process with
Slurm's environment variables, srun runs its command with the task's log files, and sacct reports
each task's state. :func:`install` puts the three commands in a folder for the front of PATH; the
state lives in $FAKE_SLURM_DIR (job counter, one state file per task, the #SBATCH options of each job).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

STATE = Path(os.environ.get("FAKE_SLURM_DIR", "/tmp/fake-slurm"))


def sbatch(script: str) -> None:
    text = Path(script).read_text()
    options = dict(re.findall(r"^#SBATCH --([\w-]+)=?(.*)$", text, flags=re.M))
    STATE.mkdir(parents=True, exist_ok=True)
    counter = STATE / "next_job_id"
    job = int(counter.read_text()) if counter.exists() else 1000
    counter.write_text(str(job + 1))
    (STATE / f"{job}.sbatch.json").write_text(json.dumps(options))
    array = re.match(r"0-(\d+)", options.get("array", ""))
    tasks = range(int(array[1]) + 1) if array else [None]
    for task in tasks:
        env = {**os.environ, "SLURM_JOB_ID": str(job if task is None else job * 100 + task)}
        env.update(SLURM_NTASKS="1", SLURM_JOB_NUM_NODES="1", SLURM_NODEID="0", SLURM_PROCID="0", SLURM_LOCALID="0")
        env.update(SLURM_JOB_NODELIST="fakenode")
        if task is not None:
            env.update(SLURM_ARRAY_JOB_ID=str(job), SLURM_ARRAY_TASK_ID=str(task))
        name = str(job) if task is None else f"{job}_{task}"
        (STATE / f"{name}.state").write_text("RUNNING")
        logs = [_filled(options.get(k, os.devnull), env) for k in ("output", "error")]
        with open(logs[0], "a") as out, open(logs[1], "a") as err:  # not sbatch's stdout: it returns at once
            command = [sys.executable, __file__, "run", name, script]
            subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)
    print(f"Submitted batch job {job}")


def run(name: str, script: str) -> None:
    """One task: the batch script, then its final state as sacct reports it."""
    code = subprocess.run(["bash", script]).returncode
    state = "COMPLETED" if code == 0 else ("NODE_FAIL" if code < 0 else "FAILED")
    (STATE / f"{name}.state").write_text(state)


def _filled(pattern: str, env: dict) -> str:
    """A log file name pattern with Slurm's %A (array job), %a (array task), %j (job) and %t (task)."""
    fill = {"%A": env.get("SLURM_ARRAY_JOB_ID", ""), "%a": env.get("SLURM_ARRAY_TASK_ID", "")}
    fill.update({"%j": env["SLURM_JOB_ID"], "%t": "0"})
    for key, value in fill.items():
        pattern = pattern.replace(key, value)
    return pattern


def srun(args: list[str]) -> None:
    """Run the command after srun's options, with --output/--error patterns filled in."""
    files = {}
    while args and args[0].startswith("-"):
        flag = args.pop(0)
        if flag in ("--output", "--error", "--cpu-bind"):
            files[flag] = _filled(args.pop(0), dict(os.environ))
    out = open(files.get("--output", os.devnull), "a")
    err = open(files.get("--error", files.get("--output", os.devnull)), "a")
    sys.exit(subprocess.run(args, stdout=out, stderr=err).returncode)


def sacct(args: list[str]) -> None:
    wanted = [args[i + 1] for i, a in enumerate(args) if a == "-j"]
    print("JobID|State|NodeList")
    for path in sorted(STATE.glob("*.state")):
        name = path.name[: -len(".state")]
        if any(name == j or name.startswith(f"{j}_") for j in wanted):
            print(f"{name}|{path.read_text()}|fakenode")


def install(folder: Path) -> None:
    """sbatch, srun and sacct in ``folder``, each running this file with this Python."""
    folder.mkdir(parents=True, exist_ok=True)
    for command in ("sbatch", "srun", "sacct"):
        path = folder / command
        path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{Path(__file__).resolve()}" {command} "$@"\n')
        path.chmod(0o755)


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    if command == "run":
        run(args[0], args[1])
    elif command == "sbatch":
        sbatch(args[-1])
    elif command == "srun":
        srun(args)
    elif command == "sacct":
        sacct(args)
    else:
        sys.exit(f"fake_slurm: unknown command {command}")
