"""Fault drill: kill -9 at points of a checkpoint save, of a preprocess shard and of its merge;
a deleted `latest` pointer; a truncated checkpoint shard and a truncated preprocess shard.

Each case ends with a plain rerun, which must resume from the newest complete state and end
bit-identical to an uninterrupted run: every tensor of the final checkpoint (weights and
optimizer state) and the trainer state; OUT.bin, OUT.idx and OUT.report.jsonl byte for byte.
One worker process runs the whole drill (tests/workers/fault_checks.py), about a minute.
"""

import json
import subprocess
import sys

import pytest
from conftest import ROOT

TRAINING_RESUMES_AT = {  # where each rerun must start: the newest whole checkpoint
    "save: shards written, pointer deleted": 2,
    "save: marked, not renamed": 2,
    "save: renamed, pointer stale": 4,
    "shard truncated": 2,
}
PREPROCESS_CASES = (
    "shard: half written",
    "shard: written, not marked",
    "merge: appending shards",
    "merge: .bin in place, .idx not",
    "shard truncated",
)


@pytest.fixture(scope="module")
def drill(tmp_path_factory):
    work = tmp_path_factory.mktemp("faults")
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests/workers/fault_checks.py"), str(work), str(work / "result.json")],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((work / "result.json").read_text())


@pytest.mark.parametrize("case", list(TRAINING_RESUMES_AT))
def test_training_resumes_from_the_newest_whole_checkpoint_bit_identically(drill, case):
    training = drill["training"]
    assert training["reference_rc"] == 0 and training["tensors_compared"] > 20
    outcome = training[case]
    assert outcome["killed_rc"] == (None if case == "shard truncated" else -9), outcome  # None: damage, no kill
    assert outcome["rerun_rc"] == 0 and outcome["rerun_started_at_step"] == TRAINING_RESUMES_AT[case], outcome
    assert outcome["identical"], outcome


@pytest.mark.parametrize("case", PREPROCESS_CASES)
def test_preprocess_rerun_gives_the_uninterrupted_files(drill, case):
    preprocess = drill["preprocess"]
    assert preprocess["tools_rc"] == 0 and preprocess["reference_rc"] == 3  # one broken image, reported
    outcome = preprocess[case]
    assert outcome["killed_rc"] == (None if case == "shard truncated" else -9), outcome
    assert outcome["rerun_rc"] == 3 and outcome["identical"], outcome
