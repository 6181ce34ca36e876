"""How long reading a store of N runs takes through MLflow and through dmgl's SQLite store reader, each in a fresh
process as a read-only command starts one.

The store is generated as ``bench/cli_latency.py`` generates it (N runs through dmgl's ``Tracker``: parents with
two seed runs each, ``dmgl.*`` tags, settings as params, ``final_*`` metrics) in a temporary registry, or in
``--home`` (kept, and reused when it already holds the runs). Each case is one ``python -c`` process, run
``--repeats`` times in turn (A B C A B C ...); printed are the median wall seconds of the process, and the median
seconds inside it of each step (imports, opening the store, the queries), with the runs the queries returned.

    python bench/store_reader.py                      # 1,000 runs, 3 repeats
    python bench/store_reader.py --home /tmp/reg --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cli_latency import generate_store  # noqa: E402

READER_MODULE = "dmgl_cli.tracking.store_reader"
SHOWN_CANDIDATES = 5  # as dmgl's find_run: one more than it shows, to know that there are more

# Each case's code runs in its own process with URI and PARENT set; `step(name)` records the seconds since the
# previous step, and the last line printed is {"steps": {...}, "runs": N}.
PRELUDE = """
import json, sys, time
URI, PARENT = sys.argv[1], sys.argv[2]
steps, last = {}, time.perf_counter()
def step(name):
    global last
    now = time.perf_counter()
    steps[name] = now - last
    last = now
runs = 0
"""
CASES = {
    "python -c pass": "",
    "import mlflow": "import mlflow\nstep('import')",
    "MlflowClient + search all runs": """
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient
step('import')
client = MlflowClient(tracking_uri=URI)
step('open')
ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
runs = len(client.search_runs(ids, run_view_type=ViewType.ACTIVE_ONLY, max_results=50000))
step('query')
""",
    "reader: search all runs": f"""
from {READER_MODULE} import SqliteStoreReader
step('import')
reader = SqliteStoreReader.open(URI)
step('open')
runs = len(reader.search(list(reader.experiments()), max_results=50000))
step('query')
""",
    "reader: id prefix (8 chars)": f"""
from {READER_MODULE} import SqliteStoreReader
step('import')
reader = SqliteStoreReader.open(URI)
step('open')
ids = list(reader.experiments())
# as dmgl's find_run: runs whose id starts with the text, and runs of that name
found = {{r.run_id for r in reader.search(ids, run_id_prefix=PARENT[:8], max_results={SHOWN_CANDIDATES + 1})}}
found |= {{r.run_id for r in reader.search(ids, run_name=PARENT[:8], max_results={SHOWN_CANDIDATES + 1})}}
runs = len(found)
step('query')
""",
    "reader: unknown id prefix": f"""
from {READER_MODULE} import SqliteStoreReader
step('import')
reader = SqliteStoreReader.open(URI)
step('open')
ids = list(reader.experiments())
found = reader.search(ids, run_id_prefix='ffffffffff', max_results={SHOWN_CANDIDATES + 1})
found += reader.search(ids, run_name='ffffffffff', max_results={SHOWN_CANDIDATES + 1})
runs = len(found)
step('query')
""",
    "reader: a run and its children": f"""
from {READER_MODULE} import SqliteStoreReader
step('import')
reader = SqliteStoreReader.open(URI)
step('open')
runs = len([reader.get_run(PARENT), *reader.children(PARENT)])
step('query')
""",
}
CODA = "\nprint(json.dumps({'steps': steps, 'runs': runs}))\n"
STEPS = ("import", "open", "query")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1000, help="Runs in the generated store (default 1000).")
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs of each case (default 3).")
    parser.add_argument("--home", type=Path, help="Registry to generate into and keep (default: a temporary one).")
    args = parser.parse_args()
    home = (args.home or Path(tempfile.mkdtemp(prefix="dmgl-store-reader-")) / "registry").resolve()
    os.environ["DMGL_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    parent_id = generate_store(args.runs)
    uri = f"sqlite:///{home / 'mlflow.db'}"
    wall: dict[str, list[float]] = {name: [] for name in CASES}
    inside: dict[str, dict[str, list[float]]] = {name: {} for name in CASES}
    found: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, code in CASES.items():  # interleaved, so that load from elsewhere hits each alike
            command = [sys.executable, "-c", PRELUDE + code + CODA, uri, parent_id]
            started = time.perf_counter()
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
            wall[name].append(time.perf_counter() - started)
            if done.returncode != 0:
                raise SystemExit(f"{name} failed:\n{done.stderr}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            for step, seconds in result["steps"].items():
                inside[name].setdefault(step, []).append(seconds)
            found[name] = result["runs"]
    print(
        f"{3 * max(1, args.runs // 3)} runs in the store {uri}; {args.repeats} repeats, {os.cpu_count()} CPUs; "
        "median seconds (process: the whole `python -c`; import, open, query: inside it)"
    )
    print("| case | process s | import s | open s | query s | runs returned |\n|---|---|---|---|---|---|")
    for name in CASES:
        parts = [f"{statistics.median(inside[name][step]):.3f}" if step in inside[name] else "-" for step in STEPS]
        print(f"| {name} | {statistics.median(wall[name]):.3f} | {' | '.join(parts)} | {found[name]} |")


if __name__ == "__main__":
    main()
