"""lm-eval on hybrids, offline (tiny fixtures in the shipped task formats, never the shared data): our LAMBADA task is
lm-eval's lambada_openai on a local file; batches of 8 score as batch 1 (loglikelihood: right padded, no mask;
generate_until: left padded, with a cache); `hybrid-mamba3 eval` puts hybrids beside their teacher."""

import json
from pathlib import Path

import lm_eval  # the dev extra brings it: these tests run, never skip
import pytest
import torch
import yaml
from test_batches import _tokenizer
from test_distill import _teacher
from test_model import hybrid

from hybrid_mamba3.cli import main
from hybrid_mamba3.evals.lm_eval_tasks import TASKS_DIR, lm_eval_scores, task_config


def _lines(gen, n, lo, hi):
    return [" ".join(f"w{int(x)}" for x in torch.randint(3, 97, (int(k),), generator=gen))
            for k in torch.randint(lo, hi, (n,), generator=gen)]


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("evals")
    g = torch.Generator().manual_seed(0)
    (root / "lambada.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in _lines(g, 16, 4, 30)))
    qs, chs = _lines(g, 8, 3, 9), [_lines(g, 3, 1, 4) for _ in range(8)]
    (root / "mc.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "answer": i % 3}) + "\n"
                                           for i, (q, c) in enumerate(zip(qs, chs))))
    (root / "text").mkdir()
    for i, t in enumerate(_lines(g, 3, 200, 300)):
        (root / "text" / f"t{i}.txt").write_text(t)
    teacher = _teacher()
    teacher.save_pretrained(root / "teacher")
    _tokenizer().save_pretrained(root / "teacher")
    model = hybrid((1, 3))
    model.save_pretrained(root / "hybrid")
    _tokenizer().save_pretrained(root / "hybrid")
    return root


def test_our_lambada_task_is_lm_evals_on_a_local_file():
    ours = yaml.safe_load((TASKS_DIR / "lambada_openai_local.yaml").read_text())
    theirs = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / "lambada" / "lambada_openai.yaml").read_text())
    for key in ("output_type", "test_split", "doc_to_text", "doc_to_target", "metric_list"):
        assert ours[key] == theirs[key], key
    assert ours["dataset_path"] == "json"  # read locally, not downloaded
    with pytest.raises(ValueError, match="does not exist"):
        task_config("lambada_openai_local", "/nonexistent.jsonl")
    with pytest.raises(ValueError, match="no shipped task"):
        task_config("lambada")


def test_batches_score_as_batch_one(fixtures):
    """Loglikelihoods (LAMBADA's perplexity, multiple choice) and greedy generations at batch 8 equal batch 1's."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fixtures / "hybrid").eval()
    tok = _tokenizer()
    tasks = {"lambada_openai_local": str(fixtures / "lambada.jsonl"), "multiple_choice_local": str(fixtures / "mc.jsonl")}
    gen_task = dict(task="greedy_local", dataset_path="json", output_type="generate_until", test_split="test",
                    dataset_kwargs=dict(data_files=dict(test=str(fixtures / "lambada.jsonl"))),
                    doc_to_text="{{text}}", doc_to_target="{{text}}",
                    generation_kwargs=dict(until=["</s>"], max_gen_toks=6, do_sample=False),
                    metric_list=[dict(metric="exact_match", aggregation="mean", higher_is_better=True)])
    scores, outputs = {}, {}
    for bs in (1, 8):
        scores[bs] = lm_eval_scores(model, tok, tasks, batch_size=bs)
        from lm_eval.models.huggingface import HFLM
        out = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=bs, backend="causal"),
                                      tasks=[gen_task], log_samples=True)
        outputs[bs] = [s["filtered_resps"] for s in out["samples"]["greedy_local"]]
    ppl = [scores[bs]["lambada_openai_local"]["perplexity"] for bs in (1, 8)]
    assert abs(ppl[0] - ppl[1]) < 1e-5 * ppl[0]  # fp32, other batch shapes: summation order only
    assert scores[1]["multiple_choice_local"]["acc"] == scores[8]["multiple_choice_local"]["acc"]
    assert outputs[1] == outputs[8] and any(o[0] for o in outputs[1])


def test_eval_command_puts_hybrids_beside_the_teacher(fixtures, tmp_path, capsys):
    assert main(["eval", str(fixtures / "hybrid"), "--teacher", str(fixtures / "teacher"), "--tasks",
                 f"lambada_openai_local={fixtures / 'lambada.jsonl'}", f"multiple_choice_local={fixtures / 'mc.jsonl'}",
                 "--perplexity", str(fixtures / "text"), "--ppl-tokens", "400", "--ppl-window", "64", "--out",
                 str(tmp_path), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "eval.json").read_text())
    teacher, hyb = result["rows"]
    assert teacher["teacher"] and teacher["layout"] == "AAAA" and hyb["layout"] == "AMAM"
    for row in (teacher, hyb):
        assert set(row["tasks"]) == {"lambada_openai_local", "multiple_choice_local"}
        assert {"perplexity", "perplexity_stderr", "acc"} <= set(row["tasks"]["lambada_openai_local"])
        assert row["perplexity"] > 1
    assert teacher["pct_of_teacher"]["heldout/perplexity"] == pytest.approx(100)
    assert hyb["pct_of_teacher"]["heldout/perplexity"] == pytest.approx(100 * teacher["perplexity"] / hyb["perplexity"])
    assert "(teacher)" in printed and "AMAM" not in printed and "2/4" in printed
    assert main(["eval", str(fixtures / "hybrid"), "--out", str(tmp_path)]) == 2  # nothing to measure


def test_table_names_each_model_by_the_shortest_tail_that_tells_it_apart():
    from hybrid_mamba3.evals.evaluate import short_names

    assert short_names(["runs/a/converted", "runs/a/align/student", "runs/a/kd/student", "runs/a/model", "t.gguf"]) \
        == ["converted", "align/student", "kd/student", "model", "t.gguf"]
    assert short_names(["x/model", "y/model"]) == ["x/model", "y/model"] and short_names(["model"]) == ["model"]
