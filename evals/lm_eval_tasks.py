"""lm-eval on hybrids and teachers, offline: the task YAMLs shipped in evals/tasks/ and one call that scores a model.

- `TASKS_DIR` is an lm-eval include path (`lm_eval --include_path`): LAMBADA (OpenAI version) and a multiple-choice
  format, both read from local jsonl files, so nothing is downloaded at run time.
- `task_config(name, data)`: a shipped task as the dict lm-eval takes, pointed at a data file.
- `lm_eval_scores(model, tokenizer, tasks)`: lm-eval's `simple_evaluate` with its own Hugging Face model class
  (`HFLM`) around an in-memory model, so a hybrid and a teacher loaded from a .gguf are scored alike.
"""

from __future__ import annotations

from pathlib import Path

import yaml

TASKS_DIR = Path(__file__).with_name("tasks")


def task_names() -> list[str]:
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def task_config(name: str, data: str | Path | None = None) -> dict:
    """The shipped task `name` (a stem in evals/tasks/) as an lm-eval task dict, reading `data` (a jsonl file)."""
    path = TASKS_DIR / f"{name}.yaml"
    if not path.exists():
        raise ValueError(f"no shipped task {name!r}; shipped: {task_names()} (or pass lm-eval task names)")
    config = yaml.safe_load(path.read_text())
    if data is not None:
        data = Path(data)
        if not data.is_file():
            raise ValueError(f"task {name}: data file {str(data)!r} does not exist")
        config["dataset_kwargs"]["data_files"]["test"] = str(data.resolve())
    return config


def lm_eval_scores(model, tokenizer, tasks: dict[str, str | None], batch_size: int = 8, limit: int | None = None,
                   device: str | None = None) -> dict:
    """{task: {metric: value, metric + "_stderr": value}} for `tasks` ({shipped name: data path}, or {lm-eval task
    name: None} for tasks lm-eval can find itself)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal",
              device=device or str(next(model.parameters()).device))
    configs = [task_config(n, d) if (TASKS_DIR / f"{n}.yaml").exists() else n for n, d in tasks.items()]
    out = lm_eval.simple_evaluate(model=lm, tasks=configs, limit=limit, log_samples=False, bootstrap_iters=100)
    scores = {}
    for task, metrics in out["results"].items():
        scores[task] = {}
        for key, value in metrics.items():
            if "," not in key or not isinstance(value, (int, float)):
                continue
            metric = key.split(",")[0]
            scores[task][metric] = float(value)
    return scores
