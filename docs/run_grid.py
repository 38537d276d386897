"""Run a grid of `docs/ema_eval.py` jobs, several at a time on one device: how session 13 ran docs/method.md's
GPU grid (14 runs sharing one H100). Jobs come from text files, one per line:

    NAME DATA SEED [KEY=VALUE ...]        # e.g.: sym_la_s0 fmnist_lt001_sym04 0 loss.name=logit_adjusted

Each job runs `python docs/ema_eval.py --data data/DATA --seed SEED --decay ... --set KEY=VALUE ... --json
OUT/NAME.json` (its output in OUT/NAME.log). The job files are re-read whenever a slot frees, so lines appended
while it runs are picked up; a job whose OUT/NAME.json exists is skipped, so a stopped grid resumes where it was.
It ends when every job has run, or when the file OUT/STOP appears (running jobs finish).

    python docs/run_grid.py --jobs grid.txt --out /tmp/grid --parallel 14 --device cuda
"""
import argparse
import os
import subprocess
import sys
import time

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--jobs", nargs="+", required=True, help="job files (NAME DATA SEED [KEY=VALUE ...] per line)")
p.add_argument("--out", required=True, help="folder for NAME.json, NAME.log and done.txt")
p.add_argument("--parallel", type=int, default=2)
p.add_argument("--config", default=None, help="passed to ema_eval.py (default: its own, the main job's config)")
p.add_argument("--device", default=None, help="passed to ema_eval.py (default: its own)")
p.add_argument("--decay", nargs="+", default=["0.99", "0.993", "0.995", "0.998"])
args = p.parse_args()
os.makedirs(args.out, exist_ok=True)


def pending(started: set[str]) -> list[list[str]]:
    jobs = []
    for path in args.jobs:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                parts = line.split("#", 1)[0].split()
                if not parts:
                    continue
                if len(parts) < 3 or not parts[2].lstrip("-").isdigit():
                    sys.exit(f"{path}:{n}: expected NAME DATA SEED [KEY=VALUE ...], got {line.strip()!r}")
                done = os.path.exists(os.path.join(args.out, parts[0] + ".json"))
                if parts[0] not in started and not done:
                    jobs.append(parts)
    return jobs


running: dict[str, tuple[subprocess.Popen, float]] = {}
started: set[str] = set()
here = os.path.dirname(os.path.abspath(__file__))
while True:
    for name, (proc, t0) in list(running.items()):
        if proc.poll() is not None:
            del running[name]
            with open(os.path.join(args.out, "done.txt"), "a") as f:
                f.write(f"{name} rc={proc.returncode} {time.time() - t0:.0f}s\n")
    free = args.parallel - len(running)  # the job files are read only when a slot is free
    todo = [] if free <= 0 or os.path.exists(os.path.join(args.out, "STOP")) else pending(started)
    if not todo and not running:
        break
    for name, data, seed, *sets in todo[:free]:
        cmd = [sys.executable, os.path.join(here, "ema_eval.py"), "--data", os.path.join("data", data),
               "--seed", seed, "--decay", *args.decay, "--json", os.path.join(args.out, name + ".json")]
        cmd += ["--device", args.device] if args.device else []
        cmd += ["--config", args.config] if args.config else []
        for kv in sets:
            cmd += ["--set", kv]
        with open(os.path.join(args.out, name + ".log"), "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"})
        running[name] = (proc, time.time())
        started.add(name)
    time.sleep(2)
