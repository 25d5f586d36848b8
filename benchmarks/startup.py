"""Start-up cost of a data set's size: ``train.py`` for 2 training steps on a big and a small COCO-format set.

Usage::

    python benchmarks/startup.py --big DIR --small DIR [--repeats 1] [--json OUT.json]
        [--cache-dir DIR] [--repo DIR] [--timeout 1800] [overrides ...]

Each run is a subprocess started from the repository root (``--repo``, default: the one holding this
script)::

    python train.py experiment=quickstart data.root=<DIR> data.cache_dir=<cache> \\
        ++trainer.max_steps=2 ++trainer.limit_val_batches=0 hydra.run.dir=<temp dir> [overrides ...]

that is the quickstart recipe (ResNet-18 SSD300, DALI CPU pipeline, batch 16) for two optimizer steps without
validation, so the time is mostly start-up: imports, parsing and validating both annotation files, checking
every image file (``data.check_images``), building the DALI pipelines and the model, and the end of the run
(checkpoint). ``limit_val_batches`` is not in ``conf/trainer/default.yaml``, hence ``++`` (add or override;
``max_steps`` is, since the quickstart's step budget).

Per data set: ``--repeats`` times a "cold" run (the data module's cache folder ``<cache-dir>/<set>``, passed
as ``data.cache_dir``, is deleted first: it holds the annotation index, the image-check stamps and a repaired
annotation copy when one is needed, see ``ssd_lightning/data/index.py``) and then a "warm" run (the same
again, the cache folder kept). The operating system's page cache is not dropped (that needs root): "cold"
means a cold *data-module cache*, not cold disks; the data set's files were usually just written or read.
The fastest run of each kind is reported (all samples are in the JSON).

Peak RSS: with GNU ``/usr/bin/time -v`` (used when present) the "Maximum resident set size" of the child, else
``os.wait4``'s ``ru_maxrss`` of the child (the same number the kernel gives ``getrusage(RUSAGE_CHILDREN)``,
but per run instead of the maximum over every child so far). Either way it is the largest peak RSS of a
*single* process of the tree (the kernel keeps the maximum over the child and its waited-for descendants, not
their sum); train.py on one CPU device runs in one process (DALI uses threads), so that is the run's peak.
The table's "peak RSS" is the largest over a set's runs.

Each run's output is searched for the data module's log lines: how many annotation files were indexed
("indexed in") or loaded from the cache ("from the cache"), and how many image sets were checked or found
checked; with ``trainer=ddp trainer.accelerator=cpu trainer.devices=2`` (as overrides) this shows that the
cold work ran once for both ranks.

Prints a table (data set, images, cold s, warm s, peak RSS MB, and big - small) and writes it, every sample
and the machine (CPUs, platform, load average before and after) to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GNU_TIME = "/usr/bin/time"
TAIL_LINES = 30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--big", type=Path, required=True, help="the big COCO-format set (data.root)")
    p.add_argument("--small", type=Path, required=True, help="the small COCO-format set (data.root)")
    p.add_argument(
        "--repeats", type=int, default=1, help="cold + warm runs per data set (the fastest counts)"
    )
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "ssd_lightning_startup_cache",
        help="data.cache_dir is <cache-dir>/<big|small>; deleted before every cold run",
    )
    p.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1], help="where train.py is")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per run before it is killed")
    p.add_argument("overrides", nargs="*", help="more train.py overrides, appended to every run")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


# ----------------------------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_info() -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gb": _mem_total_gb(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()),
    }


# ----------------------------------------------------------------------------------------------- data sets


def count_images(root: Path) -> dict:
    """Train and val image files of a COCO-format folder (either layout), without parsing the JSON."""
    counts = {}
    for split in ("train", "val"):
        for folder in (root / "images" / f"{split}2017", root / f"{split}2017"):
            if folder.is_dir():
                with os.scandir(folder) as it:
                    counts[split] = sum(1 for e in it if e.is_file())
                break
        else:
            counts[split] = 0
    return counts


# ----------------------------------------------------------------------------------------------- one run


def train_command(args: argparse.Namespace, root: Path, cache: Path, run_dir: Path) -> list[str]:
    return [
        sys.executable,
        "train.py",
        "experiment=quickstart",
        f"data.root={root.resolve()}",
        f"data.cache_dir={cache.resolve()}",
        "++trainer.max_steps=2",
        "++trainer.limit_val_batches=0",
        f"hydra.run.dir={run_dir}",
        *args.overrides,
    ]


def _max_rss_from_time(report: str) -> int | None:
    """kB from GNU time -v's "Maximum resident set size (kbytes): N"."""
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", report)
    return int(m.group(1)) if m else None


DATA_LOG_LINES = {
    "indexed": "indexed in",
    "from_cache": "from the cache",
    "images_checked": "checked (header, trailer, size) in",
    "images_already_checked": "already checked",
}


def data_log_counts(*outputs: Path) -> dict[str, int]:
    """How often each of the data module's cold/warm log lines appears in the run's output files."""
    text = "".join(p.read_text(errors="replace") for p in outputs if p.is_file())
    return {key: text.count(line) for key, line in DATA_LOG_LINES.items()}


def _tail(path: Path, lines: int = TAIL_LINES) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def run_once(cmd: list[str], cwd: Path, timeout: float, work: Path) -> dict:
    """Run ``cmd``; return wall seconds, peak RSS (MB), exit code, how RSS was measured and, on failure, the
    stderr tail."""
    out, err, time_report = work / "stdout.txt", work / "stderr.txt", work / "time.txt"
    use_time = os.access(GNU_TIME, os.X_OK)
    full = [GNU_TIME, "-v", "-o", str(time_report), *cmd] if use_time else cmd
    start = time.perf_counter()
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen(full, cwd=cwd, stdout=fo, stderr=fe, start_new_session=True)
        deadline = start + timeout
        status, usage, timed_out = 0, None, False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                pid, status, usage = os.wait4(proc.pid, 0)
                timed_out = True
                break
            time.sleep(0.05)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    rss_kb, rss_how = None, "os.wait4 ru_maxrss"
    if use_time and time_report.is_file():
        rss_kb, rss_how = _max_rss_from_time(time_report.read_text(errors="replace")), "/usr/bin/time -v"
    if rss_kb is None and usage is not None:
        rss_kb = usage.ru_maxrss  # kB on Linux
    result = {
        "seconds": round(wall, 2),
        "peak_rss_mb": round(rss_kb / 1024, 1) if rss_kb else None,
        "rss_measured_by": rss_how,
        "returncode": proc.returncode,
        "timed_out": timed_out,
        "data_log": data_log_counts(out, err),
    }
    if proc.returncode != 0 or timed_out:
        result["stderr_tail"] = _tail(err)
        result["stdout_tail"] = _tail(out, 10)
    return result


def timed_run(args: argparse.Namespace, name: str, root: Path, kind: str) -> dict:
    """One cold or warm run of ``train.py`` on ``root`` in a temporary Hydra run directory (removed after)."""
    cache = args.cache_dir / name
    if kind == "cold":
        shutil.rmtree(cache, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f"ssd_startup_{name}_{kind}_"))
    try:
        cmd = train_command(args, root, cache, work / "run")
        load_before = os.getloadavg()
        result = run_once(cmd, args.repo, args.timeout, work)
        result.update(
            {
                "set": name,
                "kind": kind,
                "command": " ".join(cmd[1:]),
                "load_before": [round(x, 2) for x in load_before],
                "load_after": [round(x, 2) for x in os.getloadavg()],
            }
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    status = "ok" if result["returncode"] == 0 else f"FAILED (exit {result['returncode']})"
    print(
        f"  {name:5s} {kind:4s} {result['seconds']:8.1f} s  peak RSS {result['peak_rss_mb']} MB  "
        f"load {result['load_before'][0]:.2f}  {status}  data log {result['data_log']}",
        flush=True,
    )
    if result["returncode"] != 0:
        print(
            "    stderr tail:\n" + "\n".join("    | " + line for line in result["stderr_tail"].splitlines())
        )
    return result


# ----------------------------------------------------------------------------------------------- report


def summarise(name: str, root: Path, runs: list[dict]) -> dict:
    ok = [r for r in runs if r["returncode"] == 0]
    counts = count_images(root)

    def best(kind: str) -> float | None:
        times = [r["seconds"] for r in ok if r["kind"] == kind]
        return min(times) if times else None

    rss = [r["peak_rss_mb"] for r in ok if r["peak_rss_mb"] is not None]
    return {
        "set": name,
        "root": str(root.resolve()),
        "train_images": counts["train"],
        "val_images": counts["val"],
        "images": counts["train"] + counts["val"],
        "cold_s": best("cold"),
        "warm_s": best("warm"),
        "peak_rss_mb": max(rss) if rss else None,
        "failed_runs": len(runs) - len(ok),
    }


def difference(big: dict, small: dict) -> dict:
    def sub(key: str) -> float | None:
        if big[key] is None or small[key] is None:
            return None
        return round(big[key] - small[key], 2)

    return {"set": "big - small", **{k: sub(k) for k in ("images", "cold_s", "warm_s", "peak_rss_mb")}}


def _cell(value: float | int | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def table(rows: list[dict]) -> str:
    lines = [
        "| data set | images (train+val) | cold s | warm s | peak RSS MB |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['set']} | {_cell(r['images'], ',d')} | {_cell(r['cold_s'], '.1f')} | "
            f"{_cell(r['warm_s'], '.1f')} | {_cell(r['peak_rss_mb'], ',.0f')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (args.repo / "train.py").is_file():
        print(f"--repo {args.repo}: no train.py there", file=sys.stderr)
        return 2
    machine = machine_info()
    print(f"{machine['cpu_model']}, {machine['cpu_count']} CPUs, load {machine['load_average'][0]:.2f}")
    sets = {"big": args.big, "small": args.small}
    runs = []
    for _ in range(args.repeats):
        for name, root in sets.items():
            for kind in ("cold", "warm"):
                runs.append(timed_run(args, name, root, kind))
    rows = [summarise(name, root, [r for r in runs if r["set"] == name]) for name, root in sets.items()]
    rows.append(difference(rows[0], rows[1]))
    print()
    print(table(rows))
    if args.json:
        machine["load_average_after"] = list(os.getloadavg())
        doc = {"machine": machine, "repo": str(args.repo.resolve()), "summary": rows, "runs": runs}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nwritten: {args.json}")
    return 1 if any(r["returncode"] != 0 for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
