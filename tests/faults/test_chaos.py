"""The chaos run of bench/chaos.py in a 60-second version: random faults against two workers, then the tally.

The same code as the ten-minute run (`.venv/bin/python bench/chaos.py`), shorter and smaller: 306 images (six of
them hostile), two workers of four threads, the production visibility timeout (240 s), one seeded sequence of
faults (seed 12: about seven of them — two kill -9 of a worker, Azurite restarts, a scorer outage, a Redis
restart, a 15 s SIGSTOP; no slow-scorer spell fits in 60 s with these). Nothing may be lost or doubled, every
image ends with its own outcome, and the job must end within 90 s of the last fault: far below the visibility
timeout, so only the leases can make it. A worker that exits by itself is restarted (as a supervisor would) and
counted in the tally row.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from fault_helpers import REPO

Report = Callable[[dict[str, Any]], None]
SEED = 12
DONE_AFTER_LAST_FAULT_S = 90.0


def _load_chaos() -> ModuleType:
    """bench/ is not a package: load the script as a module (registered first, as dataclasses need)."""
    spec = importlib.util.spec_from_file_location("blobscore_bench_chaos", REPO / "bench" / "chaos.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


chaos = _load_chaos()


# Setup ~15 s, 60 s of faults (the last one may run ~20 s over), at most 90 s to finish, the tally (and, for a job
# that did not finish, `blobscore reconcile`): ~2 minutes when the job ends soon after the faults, ~4 at worst.
@pytest.mark.timeout(360)
def test_sixty_seconds_of_random_faults_lose_nothing_double_nothing_and_the_job_ends_soon_after(
    tmp_path: Path, fault_report: Report
) -> None:
    # 1.5 s per Predict: 8 threads score ~5 images/s, so the 306 images last about as long as the faults.
    config = chaos.ChaosConfig(duration_s=60, images=300, workers=2, concurrency=4, latency_ms=1500, seed=SEED,
                               settle_timeout_s=DONE_AFTER_LAST_FAULT_S, workdir=tmp_path)
    report = chaos.run_chaos(config)
    fault_report(_tally_row(report))
    report_file = tmp_path / "chaos-report.json"  # next to the run's logs and the broker's AOF
    report_file.write_text(json.dumps(report, indent=1, ensure_ascii=False))
    totals = report["totals"]
    assert report["faults"]["total"] >= 4, report["faults"]
    if totals["lost"]:
        # Why: the broker's history of each lost image's messages (from its AOF), the workers that exited by
        # themselves, the faults and when they struck; in full, not cut short by pytest's assertion rewriting.
        evidence = {key: report[key] for key in ("lost_image_broker_history", "worker_exits_not_caused_by_us",
                                                 "failures")}
        pytest.fail(f"{totals['lost']} image(s) lost; report {report_file}\n"
                    f"{json.dumps({**evidence, 'faults': report['faults']['events']}, indent=1)}", pytrace=False)
    assert totals["doubled"] == 0, report["jobs"]
    assert totals["rewritten_results"] == 0, report["jobs"]
    assert totals["unexpected_rejections"] == 0, report["jobs"]
    assert totals["rejected_codes"] == {code: totals["jobs"] for code in chaos.EXPECTED_CODES.values()}, totals
    # No worker ends by itself: kombu's "'NoneType' object has no attribute 'hostname'" used to stop one across a
    # Redis restart now and then (worker/kombu_restore.py).
    assert report["worker_exits_not_caused_by_us"] == [], report["worker_exits_not_caused_by_us"]
    recovery = report["last_fault_to_last_job_end_s"]
    assert recovery is not None, f"a job not done {DONE_AFTER_LAST_FAULT_S:.0f} s after the last fault: {report_file}"
    assert recovery <= DONE_AFTER_LAST_FAULT_S, report_file


def _tally_row(report: dict[str, Any]) -> dict[str, Any]:
    """The report in the shape of the fault suite's tally table (tests/faults/conftest.py)."""
    totals = report["totals"]
    return {
        "scenario": f"chaos 60 s, seed {SEED}, {report['faults']['total']} faults", "listed": totals["listed"],
        "results": totals["ok"] + totals["rejected"], "rejected": totals["rejected"], "lost": totals["lost"],
        "doubled": totals["doubled"], "scorer_calls_per_image": totals["scorer_calls_per_image_avg"],
        "scorer_calls_max": totals["scorer_calls_per_image_max"], "recovery_s": report["last_fault_to_last_job_end_s"],
        "faults": report["faults"]["by_kind"], "images_pending_at_last_fault": report["images_pending_at_last_fault"],
        "worker_exits_not_caused_by_us": len(report["worker_exits_not_caused_by_us"]),
        "stranded_messages": report["stranded_messages"],
    }
