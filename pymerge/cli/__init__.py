"""`pymerge ...` command line: a thin layer over the Python API (pymerge.divmerge, pymerge.adamerging,
pymerge.methods).

    pymerge methods
    pymerge divmerge --base DIR --model NAME=DIR [--model ...] --data NAME=FILE.jsonl [--data ...] --out DIR
                     [--kind auto|classification|causal-lm] [--granularity layer|task] [--divergence js|kl]
                     [--task-specific-keys REGEX] [--steps N | --epochs N] [--lr ...] [--no-cache] ...
    pymerge adamerging --base DIR --model NAME=DIR [...] --data NAME=FILE.jsonl [...] --out DIR
                     [--granularity layer|task] [--steps N] [--lr ...] [--no-clamp] ...   (classification)
    pymerge merge CONFIG.yaml [--out DIR] | --method NAME --base DIR --model DIR ... --param K=V --out DIR
    pymerge eval --suite text --methods ... [--subsets 2,4,6] [--task NAME=FILE] [--model NAME=DIR] --out DIR

The method options' flags are generated from the methods' declarations (the Params of
pymerge.methods.get("divmerge") / get("adamerging"), what `pymerge methods` prints): --NAME VALUE, --no-NAME
for a switch that defaults on (--quiet and --no-cache are the older spellings of --no-progress and
--no-teacher-cache), --no-NAME for None where None means something (--no-clamp); their values are checked
by the same Params as the Python call's.

Models are Hugging Face directories, read locally only (HF_HUB_OFFLINE=1, local_files_only): the base with
the fine-tuned models' class (AutoModelForSequenceClassification or AutoModelForCausalLM) and the tokenizer
of the base (else of the first model). Data: UTF-8 JSONL (a leading byte order mark is allowed), one
{"text": ...} object per line (other fields such as "label" are ignored: both methods use unlabelled inputs).
Every input (paths, --out and --cache-dir writability, --device, the models' kind, the data) is checked before
a model is loaded; a bad one exits with status 2 and one `pymerge <command>: error: ...` line, an internal
error with status 1 and a traceback. The output directory appears complete or not at all: everything is
written into a temporary sibling directory that is then renamed. It holds the merged model (save_pretrained +
tokenizer) and <method>.json (the learned Γ per task and group, the loss curve, the options); for
classification with task-specific heads, one complete model per task in OUT/<NAME>/.
DivMerge's teacher outputs are cached on disk (--cache-dir, default $PYMERGE_CACHE or ~/.cache/pymerge).

One module per command family (learned.py: divmerge, adamerging; merge.py: merge; eval.py: eval), what they
share in common.py; a new command is a module with add_parsers(sub), listed in COMMANDS. Nothing else in pymerge imports this package.
"""
import argparse
import json  # noqa: F401 (tests patch cli.json.dump)
import logging
import sys

from . import eval as eval_command, learned, merge as merge_command
from .common import (CLIError, EXIT_USAGE, add_option_flags, check_device, check_options, option_flag,
                     parse_pairs, read_jsonl_texts)
from .learned import IO_ARGUMENTS, cmd_adamerging, cmd_divmerge, given_options

__all__ = ["main", "build_parser", "CLIError", "EXIT_USAGE", "add_option_flags", "check_device", "check_options",
           "option_flag", "parse_pairs", "read_jsonl_texts", "IO_ARGUMENTS", "cmd_adamerging", "cmd_divmerge",
           "given_options"]

# The modules that add subcommands (each has add_parsers(sub)).
COMMANDS = (learned, eval_command, merge_command)


def cmd_methods(args):
    from .. import methods
    for name in methods.available("all"):
        print(methods.get(name).describe())
        print()
    return 0


def build_parser():
    p = argparse.ArgumentParser(prog="pymerge", description="Fast model merging: CART, DivMerge and relatives.")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("methods", help="list the registered merging methods and their parameters")
    m.set_defaults(func=cmd_methods)
    for module in COMMANDS:
        module.add_parsers(sub)
    return p


def _log_to_stderr():
    """A handler showing pymerge's progress lines (logger "pymerge": models read, every N optimiser steps,
    experts built) on stderr for this command, or None when the caller has configured that logger already."""
    logger = logging.getLogger("pymerge")
    if logger.handlers:
        return None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    return handler


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    # Only while the command runs: main() may be called in-process (tests, notebooks), whose stderr changes.
    handler = _log_to_stderr()
    try:
        return args.func(args)
    except CLIError as e:
        message = " ".join(str(e).split("\n"))  # one line, also for wrapped multi-line library messages
        print(f"pymerge {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        if handler is not None:
            logging.getLogger("pymerge").removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
