"""Real evaluation: classification tasks with fixed splits (tasks.py) and experts fine-tuned from a pretrained
encoder, cached on disk (experts.py). Sits beside the entry points: it may import pymerge's methods, learn,
teachers and ops; nothing below it imports it."""
from .experts import (Backbone, Expert, FineTuneSettings, MeanPooledClassifier, build_experts, classifier_state,
                      evaluate)
from .tasks import PACKAGED_TASKS, Task, load_task, task_from_jsonl

__all__ = ["Task", "load_task", "task_from_jsonl", "PACKAGED_TASKS", "Backbone", "Expert", "FineTuneSettings",
           "MeanPooledClassifier", "build_experts", "classifier_state", "evaluate"]
