"""Alignment data: TRL's plain and conversational formats, implicit prompts, and errors that
name the file, the line and the field; encoding, truncation and batching of completions."""

import json

import pytest
import torch

from lmstack.errors import ConfigError
from lmstack.tokenizer.byte_level import byte_level_tokenizer
from lmstack.train.align_common import collate, completion_logps, encode
from lmstack.train.align_data import (DataError, read_preference, read_prompts, read_unpaired,
                                      split_prompt)

U = {"role": "user", "content": "What colour is the sky?"}


def A(text):
    return {"role": "assistant", "content": text}


def _write(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(p)


GOOD = {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}


def test_plain_conversational_and_implicit_prompts(tmp_path):
    rows = [GOOD,
            {"prompt": [U], "chosen": [A("Blue.")], "rejected": [A("Green.")]},
            "",  # blank lines are skipped but still counted
            {"chosen": [U, A("Blue.")], "rejected": [U, A("Green.")]},
            {"chosen": "The sky is blue.", "rejected": "The sky is green."}]
    ex = read_preference(_write(tmp_path, rows))
    assert [e.line for e in ex] == [1, 2, 4, 5]
    assert (ex[0].prompt, ex[0].chosen, ex[0].rejected) == ("The sky is", " blue.", " green.")
    assert ex[1].prompt == [U] and ex[1].chosen == [A("Blue.")]
    assert (ex[2].prompt, ex[2].chosen, ex[2].rejected) == ([U], [A("Blue.")], [A("Green.")])
    assert (ex[3].prompt, ex[3].chosen, ex[3].rejected) == ("The sky is", " blue.", " green.")


def test_implicit_plain_prompt_keeps_words_whole():
    assert split_prompt("The cat sat", "The car sat") == ("The", " cat sat", " car sat")
    assert split_prompt("Yes", "No") == ("", "Yes", "No")


@pytest.mark.parametrize("row, field, words", [
    ({"prompt": "p", "chosen": "a"}, "'rejected'", "missing field"),
    ({"prompt": "p", "chosen": "", "rejected": "b"}, "'chosen'", "empty"),
    ({"prompt": "p", "chosen": "   ", "rejected": "b"}, "'chosen'", "empty"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "'chosen' and 'rejected'", "the same"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "'chosen'", "is a int, expected a string"),
    ({"prompt": "p", "chosen": [{"role": "assistant"}], "rejected": [A("b")]}, "'chosen', message 0", "content"),
    ({"prompt": [U], "chosen": [A("a")], "rejected": [{"role": "user", "content": "b"}]}, "'rejected'",
     "end with an assistant"),
    ({"prompt": [U], "chosen": [A("")], "rejected": [A("b")]}, "'chosen'", "empty assistant"),
    ({"prompt": "p", "chosen": [A("a")], "rejected": [A("b")]}, "mix plain text and messages", ""),
    ({"chosen": [U, A("a")], "rejected": [U, A("a")]}, "'chosen' and 'rejected'", "the same"),
])
def test_bad_preference_lines_name_file_line_and_field(tmp_path, row, field, words):
    path = _write(tmp_path, [GOOD, row])
    with pytest.raises(DataError) as e:
        read_preference(path, "val_data")
    msg = str(e.value)
    assert msg.startswith(f"val_data: {path}:2: "), msg
    assert field in msg and words in msg, msg


def test_bad_json_and_wrong_top_level_type(tmp_path):
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid JSON"):
        read_preference(_write(tmp_path, [GOOD, '{"prompt": "x", "chosen": ']))
    with pytest.raises(DataError, match=r"d.jsonl:1: got a JSON list, expected an object"):
        read_preference(_write(tmp_path, ["[1, 2]"]))
    with pytest.raises(ConfigError, match="not found"):
        read_preference(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ConfigError, match="has no examples"):
        read_preference(_write(tmp_path, ["", "  "]))
    with pytest.raises(ConfigError, match="no builtin dataset 'nope'"):
        read_preference("builtin:nope")


def test_unpaired_and_prompts(tmp_path):
    ex = read_unpaired(_write(tmp_path, [{"prompt": [U], "completion": [A("Blue.")], "label": True},
                                         {"prompt": "2+2=", "completion": " 5", "label": False}]))
    assert [(e.label, e.line) for e in ex] == [(True, 1), (False, 2)]
    for row, words in [({"prompt": "p", "completion": "c", "label": 1}, "'label' is 1, expected true or false"),
                       ({"prompt": "p", "completion": "c"}, "missing field 'label'"),
                       ({"prompt": "p", "completion": "", "label": True}, "'completion' is empty")]:
        with pytest.raises(DataError, match=f"d.jsonl:1: .*{words}"):
            read_unpaired(_write(tmp_path, [row]))
    ps = read_prompts(_write(tmp_path, [{"prompt": "1+1=", "answer": "2"}, {"prompt": [U]}]))
    assert ps[0].extra == {"answer": "2"} and ps[1].prompt == [U] and ps[1].line == 2
    with pytest.raises(DataError, match="d.jsonl:1: field 'prompt' is empty"):
        read_prompts(_write(tmp_path, [{"prompt": ""}]))


def test_encode_conversational_and_plain():
    tok = byte_level_tokenizer()
    p, c = encode(tok, [U], [A("Blue.")], max_len=1000)
    assert tok.decode(p) == tok.apply_chat_template([U], add_generation_prompt=True)
    assert tok.decode(c) == "Blue.<|im_end|>"
    p, c = encode(tok, "The sky is", " blue.", max_len=1000)
    assert tok.decode(c) == " blue.<|endoftext|>"
    # the prompt keeps its last max_prompt_len tokens, then the completion is cut to fit max_len
    p2, c2 = encode(tok, "The sky is", " blue.", max_len=6, max_prompt_len=4)
    assert p2 == p[-4:] and c2 == c[:2]
    assert encode(tok, "The sky is", " blue.", max_len=4, max_prompt_len=4) is None


def test_completion_logps_match_a_plain_log_softmax():
    from lmstack.model import Transformer, preset

    torch.manual_seed(0)
    model = Transformer(preset("tiny-llama")).eval()
    tok = byte_level_tokenizer()
    items = [encode(tok, "Q: 1+1=", " 2", 100), encode(tok, [U], [A("Blue, mostly.")], 100)]
    b = collate(items, 0)
    assert b["input_ids"].shape == b["completion_mask"].shape
    assert b["completion_mask"].sum(1).tolist() == [len(c) for _, c in items]
    with torch.no_grad():
        s, n = completion_logps(model, b["input_ids"], b["completion_mask"], loss_chunk=7)
        logits = model(b["input_ids"][:, :-1]).float()
        want = []
        for row, (p, c) in enumerate(items):
            lp = torch.log_softmax(logits[row], -1)
            want.append(sum(float(lp[len(p) - 1 + j, t]) for j, t in enumerate(c)))
        s_full, _ = completion_logps(model, b["input_ids"], b["completion_mask"], selective=False)
    assert n.tolist() == [len(c) for _, c in items]
    assert torch.allclose(s, torch.tensor(want), atol=1e-4)
    assert torch.allclose(s_full, s, atol=1e-4)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_completion_logps_gradients_match_the_plain_path(method):
    """The one vocabulary walk (frozen table) and the per-sequence fused loss (full) give the
    gradients of a plain float32 log-softmax, weighted per sequence as a preference loss does."""
    from lmstack.model import Transformer, preset
    from lmstack.peft import PEFTConfig, apply_peft
    from lmstack.peft.lora import LoRALinear

    torch.manual_seed(0)
    model = Transformer(preset("tiny-llama"))
    if method == "lora":
        apply_peft(model, PEFTConfig(method="lora", r=4, alpha=8))
        for m in model.modules():
            if isinstance(m, LoRALinear):
                torch.nn.init.normal_(m.lora_B, std=0.1)
    tok = byte_level_tokenizer()
    b = collate([encode(tok, "Q: 1+1=", " 2", 100), encode(tok, [U], [A("Blue, mostly.")], 100),
                 encode(tok, "x", " yz", 100)], 0)
    weights = torch.tensor([1.0, -2.0, 0.5])
    grads = []
    for selective in (True, False):
        model.zero_grad()
        s, _ = completion_logps(model, b["input_ids"], b["completion_mask"], loss_chunk=5, selective=selective)
        (s * weights).sum().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-5, rtol=1e-4), k
