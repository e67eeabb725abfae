"""slm-convert: turn an agent's logged LLM calls into fine-tuned small language models.

One module per stage of the conversion (Belcak et al., 2025), each plain functions over pandas
tables and dataclasses, with no Dagster imports:

    ingest -> curate -> cluster -> select -> finetune -> evaluate -> promote
"""
