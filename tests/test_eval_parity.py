"""Parity of the harness with reference tools on SmolLM2-135M-Instruct exported to a Hugging Face
folder: multiple-choice acc / acc_norm and per-choice log-likelihoods against lm-evaluation-harness
(PyPI ``lm-eval``, local data), perplexity against transformers on the same windows."""

import json
import math

import pytest
import torch

from lmstack.eval import datasets as D
from lmstack.eval.lm_metrics import perplexity
from lmstack.eval.models import LLMModel
from lmstack.eval.tasks import TaskConfig, run_task

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_hf(smollm2, tmp_path_factory):
    path = tmp_path_factory.mktemp("smollm2-hf")
    smollm2.save(path, format="hf")
    return path


def test_multiple_choice_matches_lm_evaluation_harness(smollm2, smollm2_hf, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = D.HERE / "multiple_choice.jsonl"
    (tmp_path / "mc.yaml").write_text(
        "task: lmstack_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {json.dumps(str(data))}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    ref = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={smollm2_hf},dtype=float32",
                                  tasks=["lmstack_mc"], task_manager=TaskManager(include_path=str(tmp_path)),
                                  log_samples=True, batch_size=8, device="cpu")
    samples = sorted(ref["samples"]["lmstack_mc"], key=lambda s: s["doc_id"])
    model = LLMModel(smollm2)
    ours = run_task(TaskConfig(name="mc", kind="multiple_choice", dataset="multiple_choice", choices_as="text"),
                    model, n_resamples=0, progress=False)
    items = D.load_multiple_choice()
    lls = model.loglikelihood_batch([(f"Question: {it.question}\nAnswer:", f" {c}") for it in items for c in it.choices])
    theirs = [ll for s in samples for ll, _ in s["filtered_resps"]]
    assert len(theirs) == len(lls) == 120
    assert max(abs(a - b) for a, b in zip(lls, theirs)) < 1e-3
    assert ours.item_scores["accuracy"] == [float(s["acc"]) for s in samples]
    assert ours.item_scores["accuracy_norm"] == [float(s["acc_norm"]) for s in samples]
    res = ref["results"]["lmstack_mc"]
    assert ours.metrics["accuracy"].value == pytest.approx(res["acc,none"])
    assert ours.metrics["accuracy_norm"].value == pytest.approx(res["acc_norm,none"])


def test_perplexity_matches_transformers(smollm2, smollm2_hf):
    transformers = pytest.importorskip("transformers")
    from test_eval_lm_metrics import hf_reference_nll

    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32).eval()
    text = " ".join(p.text for p in D.load_passages()[:4])
    ids = smollm2.tokenizer.encode(text, add_special_tokens=False)
    nll, count = hf_reference_nll(hf, ids, 128, 64)
    r = perplexity(smollm2, [text], window=128, stride=64)
    assert r.n_tokens == count == len(ids) - 1
    assert r.perplexity == pytest.approx(math.exp(nll / count), rel=1e-4)
    short_text = "The quick brown fox jumps over the lazy dog. Paris is the capital of France."
    short_ids = smollm2.tokenizer.encode(short_text, add_special_tokens=False)
    short_nll, short_count = hf_reference_nll(hf, short_ids, 128, 64)  # one window: the whole text
    short = perplexity(smollm2, [short_text], window=128, stride=64)
    assert short.perplexity == pytest.approx(math.exp(short_nll / short_count), rel=1e-4)
