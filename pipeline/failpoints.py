"""Named points where a test kills the process, to prove that a crash there loses nothing.

    SLM_FAILPOINT=before-rename:curated_traces.parquet slm-convert run

kills the run (SIGKILL: no cleanup, no `finally`, as a power cut or the OOM killer would) when
it reaches that point. Unset, a point costs one environment lookup. The points: every atomic
write just before its rename (`before-rename:<file name>`; a folder put in place whole, an adapter
or a specialist, `before-rename:<folder name>`), collection after its ledger commit
and before its parts are published (`raw_traces:committed`), fine-tuning after it saved a
checkpoint (`finetune:checkpoint-saved`). tests/test_crash_recovery.py uses them.
"""

import os
import signal

ENV = "SLM_FAILPOINT"


def reached(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
