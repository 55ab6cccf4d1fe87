"""pymerge.io: models on disk in and out, for merges that never hold a whole model in memory.

One concern per module:
  tensor_info.py      TensorInfo (shape, dtype, bytes): what a reader knows from a header
  errors.py           ModelFileError: a bad file or directory, the message naming it
  safetensors_file.py one .safetensors file: validated header, lazy memory-mapped tensors, pages released
  checkpoint.py       one .bin / .pt checkpoint: torch.load(weights_only=True, mmap=True) only, tied tensors
  model_dir.py        open_model(path): a Hugging Face directory (sharded or not) or one file, shard names
                      kept inside the directory
  validation.py       check_against_base: every model's keys, shapes, dtypes, ties against the base's
  writer.py           plan_shards / ShardWriter: sharded safetensors + index json written in place;
                      copy_model_files: config, tokenizer, generation and chat-template files
  atomic_dir.py       AtomicDirectory (temporary sibling, fsync, rename; SIGINT / SIGTERM clean up),
                      refuse_overlap (no output inside an input)
  distributed.py      torchrun: Session (rank, agreement collectives), assign_groups / group_cost (the work split)
  jsonl.py            jsonl_objects: users' JSON Lines files (tasks, unlabelled inputs), errors naming FILE:LINE
A reader is a mapping with key_info(key) (pymerge.merge reads shapes and dtypes from it before any data),
release(keys) and aliases(); nothing here imports the methods.
"""
from .atomic_dir import AtomicDirectory, Interrupted, refuse_overlap
from .errors import ModelFileError
from .model_dir import Model, open_model
from .tensor_info import TensorInfo
from .validation import check_against_base, mismatches
from .writer import (CONFIG_FILES, DEFAULT_MAX_SHARD_SIZE, TOKENIZER_FILES, ShardPlan, ShardWriter,
                     copy_model_files, parse_size, plan_shards)

__all__ = ["AtomicDirectory", "Interrupted", "refuse_overlap", "ModelFileError", "Model", "open_model",
           "TensorInfo", "check_against_base", "mismatches", "CONFIG_FILES", "DEFAULT_MAX_SHARD_SIZE",
           "TOKENIZER_FILES", "ShardPlan", "ShardWriter", "copy_model_files", "parse_size", "plan_shards"]
