"""Real evaluation: classification tasks with fixed splits (tasks.py), experts fine-tuned from a pretrained
encoder and cached on disk (experts.py), the harness that merges them with each method and measures the
merged model (harness.py), and its reports (report.py); the generative suite's text domains and per-domain
perplexity (lm_data.py), its causal-LM experts (lm_experts.py) and its harness (lm_harness.py). Sits beside
the entry points: it may import pymerge's methods, learn, teachers and ops; nothing below it imports it."""
from .experts import (Backbone, Expert, FineTuneSettings, MeanPooledClassifier, build_experts, classifier_state,
                      evaluate)
from .harness import (DEFAULT_GRIDS, DEFAULT_LEARNED, EvalResult, Member, Row, Suite, Variant, run_evaluation,
                      subsets, suite_from_experts, suite_from_model_dirs, variants)
from .lm_data import DEFAULT_DOMAINS, Domain, domain_from_jsonl, domain_from_task, domain_perplexity, load_domain
from .lm_experts import LMBase, LMExpert, LMFineTuneSettings, build_lm_experts, dequantize_gguf
from .lm_harness import (LMEvalResult, LMMember, LMRow, LMSuite, lm_suite_from_experts, lm_suite_from_model_dirs,
                         lm_variants, run_lm_evaluation)
from .report import console_table, lm_console_table, write_reports
from .tasks import PACKAGED_TASKS, Task, load_task, task_from_jsonl

__all__ = ["Task", "load_task", "task_from_jsonl", "PACKAGED_TASKS", "Backbone", "Expert", "FineTuneSettings",
           "MeanPooledClassifier", "build_experts", "classifier_state", "evaluate", "DEFAULT_GRIDS",
           "DEFAULT_LEARNED", "EvalResult", "Member", "Row", "Suite", "Variant", "run_evaluation", "subsets",
           "suite_from_experts", "suite_from_model_dirs", "variants", "console_table", "write_reports",
           "DEFAULT_DOMAINS", "Domain", "LMBase", "LMExpert", "LMFineTuneSettings", "build_lm_experts",
           "dequantize_gguf", "domain_from_jsonl", "domain_from_task", "domain_perplexity", "load_domain",
           "LMEvalResult", "LMMember", "LMRow", "LMSuite", "lm_suite_from_experts", "lm_suite_from_model_dirs",
           "lm_variants", "run_lm_evaluation", "lm_console_table"]
