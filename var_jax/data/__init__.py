"""Preference data: formats -> tokenize -> prompt-grouped grain batches; plus the embedded synthetic task."""
from var_jax.data.formats import LoadStats, PreferenceRecord, load_preferences
from var_jax.data.pipeline import (PAD_PROMPT, GatherScores, PipelineConfig, PreferencePipeline, build_pipeline,
                                   build_sequences, cross_pairs, epoch_groups, make_blocks, measure_throughput,
                                   shard_blocks)
from var_jax.data.tokenize import TokenizedRecord, Tokenizer, TokenizeStats, tokenize_records
