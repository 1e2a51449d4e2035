"""Evaluation: tasks defined in small YAML files, four ways to score them, learning vs forgetting.

=============  ================================================================  ====================================
kind           what is measured                                                  module
=============  ================================================================  ====================================
perplexity     mean token loss on a text/instruction set, exp of it              `perplexity`
choice         log-likelihood of each choice: acc, acc_norm (per character)      `choice`
exact          greedy generation, answer extraction, exact match                 `exact`
code           HumanEval-style pass@k in a bubblewrap sandbox (opt-in)           `code`, `screen`, `judge`, `sandbox`
=============  ================================================================  ====================================

Entry points: `run_tasks` (a list of task names/paths → results dict), `print_results` / `save_results`,
`learning_forgetting` (base vs trained on target and source tasks), `EvalCache` + `model_fingerprint`
(base-model results computed once per sweep), `run_harness` (lm-eval-harness tasks; optional extra).
Task YAML schema: see `tunelab.eval.tasks`; bundled tasks: `list_tasks()`.

May import: data, models, adapters.base, objectives, sampling/generate; never train/ or lab/.
"""

from .choice import Score, score_continuations
from .code import pass_at_k
from .exact import extract_answer, normalize
from .forgetting import EvalCache, learning_forgetting, model_fingerprint, run_results_fields, task_delta
from .harness import HarnessAdapter, make_lm, run_harness
from .runner import print_results, results_table, run_tasks, save_results, validate_tasks
from .sandbox import SandboxResult, run_sandboxed
from .tasks import KINDS, Task, TaskSpec, list_tasks, load_task, task_from_dict

__all__ = [
    "KINDS", "EvalCache", "HarnessAdapter", "SandboxResult", "Score", "Task", "TaskSpec", "extract_answer",
    "learning_forgetting", "list_tasks", "load_task", "make_lm", "model_fingerprint", "normalize", "pass_at_k",
    "print_results", "results_table", "run_harness", "run_results_fields", "run_sandboxed", "run_tasks",
    "save_results", "score_continuations", "task_delta", "task_from_dict", "validate_tasks",
]
