"""Where a reply stops, and what pads a batch: one rule (sftlab.data.special_tokens) for `sftlab generate`
and for evaluation by generation during training.

The expected stop ids are read off each template's text: the special token it writes right after an
assistant reply and right after an assistant tool call, plus the tokenizer's EOS. The templates are the
Qwen3-style and harmony-style ones of examples/templates/ (also used by test_as_served.py), a DeepSeek-style
one written here, and ChatML.
"""

from __future__ import annotations

import os

import pytest
import torch

import sftlab.generate
from sftlab.data.chat import CHATML
from sftlab.data.examples import TargetSettings
from sftlab.data.prompts import generation_prompts
from sftlab.data.special_tokens import pad_token_id
from sftlab.generate import Reply, generate_batch, generate_replies
from sftlab.training.evaluation import GenerationEval, exact_match
from tiny import chat_token_id, char_tokenizer, hand_ids, ids, special_id

TEMPLATES = os.path.join(os.path.dirname(__file__), "..", "examples", "templates")
QWEN3 = open(os.path.join(TEMPLATES, "qwen3_style.jinja"), encoding="utf-8").read()
HARMONY = open(os.path.join(TEMPLATES, "harmony_style.jinja"), encoding="utf-8").read()

# DeepSeek-R1/V3 style: a reply is "<｜Assistant｜>" + content + "<｜end▁of▁sentence｜>", and the tokenizer's
# EOS is that end of sentence. Tool calls are not rendered (a tool-call turn has no content to show).
BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
DEEPSEEK = (
    "{{- bos_token }}{%- for m in messages %}"
    "{%- if m.role == 'system' %}{{- m.content }}"
    "{%- elif m.role == 'user' %}{{- '" + USER + "' + m.content }}"
    "{%- elif m.role == 'assistant' %}{{- '" + ASSISTANT + "' + m.content + '" + EOS + "' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '" + ASSISTANT + "' }}{%- endif %}"
)
DEEPSEEK_TOKENS = [BOS, EOS, USER, ASSISTANT]


def deepseek_tokenizer():
    tokenizer = char_tokenizer(chat_template=DEEPSEEK, chat_tokens=True)
    tokenizer.add_special_tokens({"bos_token": BOS, "eos_token": EOS, "additional_special_tokens": [USER, ASSISTANT]})
    return tokenizer


def deepseek_id(token: str) -> int:
    # Added after the whole chat_tokens vocabulary, in the order given above.
    return len(char_tokenizer(chat_tokens=True)) + DEEPSEEK_TOKENS.index(token)


# name -> (tokenizer, expected stop ids, expected pad id)
CASES = {
    # A reply ends "<|im_end|>"; a tool call "</tool_call><|im_end|>" (</tool_call> is not special).
    "qwen3": (lambda: char_tokenizer(chat_template=QWEN3, chat_tokens=True),
              sorted([special_id("</s>"), special_id("<|im_end|>")]), special_id("<pad>")),
    # The last reply ends "<|return|>", a tool call "<|call|>". <|end|> (after the analysis channel, and
    # after a final answer once it is history) is never a stop.
    "harmony": (lambda: char_tokenizer(chat_template=HARMONY, chat_tokens=True),
                sorted([special_id("</s>"), chat_token_id("<|return|>"), chat_token_id("<|call|>")]),
                special_id("<pad>")),
    # gpt-oss's own tokenizer has <|return|> as EOS and no other pad: pads fall back to EOS.
    "harmony, EOS <|return|>": (lambda: char_tokenizer(chat_template=HARMONY, chat_tokens=True, eos="<|return|>",
                                                       pad=False),
                                sorted([chat_token_id("<|return|>"), chat_token_id("<|call|>")]),
                                chat_token_id("<|return|>")),
    "deepseek": (deepseek_tokenizer, [deepseek_id(EOS)], special_id("<pad>")),
    # ChatML writes no tool calls: the reply's "<|im_end|>" and EOS.
    "chatml": (lambda: char_tokenizer(chat_template=CHATML), sorted([special_id("</s>"), special_id("<|im_end|>")]),
               special_id("<pad>")),
}


def generate_settings(tokenizer, monkeypatch) -> tuple[list[int], int]:
    """The stop ids and pad id that `sftlab generate` (generate_replies) hands to the decoding loop."""
    seen = {}

    def record(model, prompt_ids, *, stop_ids, pad_id, max_new_tokens, synced_processes=False):
        seen.update(stop_ids=stop_ids, pad_id=pad_id)
        return [Reply([], True) for _ in prompt_ids]

    monkeypatch.setattr(sftlab.generate, "generate_batch", record)
    generate_replies(None, tokenizer, ["hi"])
    return seen["stop_ids"], seen["pad_id"]


def evaluation_settings(tokenizer, tmp_path) -> tuple[list[int], int]:
    """The stop ids and pad id of training's evaluation by generation on a chat eval set."""
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    prompts = generation_prompts([record], tokenizer, TargetSettings(), limit=1)
    evaluation = GenerationEval(prompts, tokenizer, [("exact_match", exact_match)], max_new_tokens=4, batch_size=1,
                                log_samples=0, output_dir=str(tmp_path), sharded=False, write=False)
    return evaluation.stop_ids, evaluation.pad_id


@pytest.mark.parametrize("name", list(CASES))
def test_generate_and_evaluation_stop_and_pad_alike(name, monkeypatch, tmp_path):
    make_tokenizer, stops, pad = CASES[name]
    tokenizer = make_tokenizer()
    assert generate_settings(tokenizer, monkeypatch) == (stops, pad)
    assert evaluation_settings(tokenizer, tmp_path) == (stops, pad)
    assert pad_token_id(tokenizer) == pad


def test_harmony_never_stops_at_end_of_analysis():
    assert special_id("<|end|>") not in CASES["harmony"][1]


class Scripted(torch.nn.Module):
    """A stand-in model whose greedy continuation is written out: generate returns the prompt, then
    `continuation`, whatever stops it (the real decoding loop stops at the first stop id, which is
    exactly where generate_batch cuts)."""

    def __init__(self, continuation: list[int]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.continuation = continuation

    def generate(self, input_ids, attention_mask, generation_config, synced_gpus):
        assert generation_config.eos_token_id is not None
        tail = torch.tensor([self.continuation] * len(input_ids))
        return torch.cat([input_ids, tail], dim=1)


# name -> (what the model writes after the generation prompt, the reply kept: through the final answer)
WRITTEN = {
    "harmony": (hand_ids("<|channel|>analysis<|message|>2+2 is 4.<|end|><|start|>assistant<|channel|>final<|message|>4"
                         "<|return|>", chat_tokens=True) + ids("junk"),
                hand_ids("<|channel|>analysis<|message|>2+2 is 4.<|end|><|start|>assistant<|channel|>final<|message|>4",
                         chat_tokens=True)),
    "qwen3": (hand_ids("<think>\n2+2 is 4.\n</think>\n\n4<|im_end|>\n", chat_tokens=True) + ids("junk"),
              hand_ids("<think>\n2+2 is 4.\n</think>\n\n4", chat_tokens=True)),
    "deepseek": ([chat_token_id("<think>")] + ids("\n2+2 is 4.\n") + [chat_token_id("</think>")] + ids("\n\n4")
                 + [deepseek_id(EOS)] + ids("junk"),
                 [chat_token_id("<think>")] + ids("\n2+2 is 4.\n") + [chat_token_id("</think>")] + ids("\n\n4")),
}


@pytest.mark.parametrize("name", list(WRITTEN))
def test_a_reply_stops_after_its_final_answer(name, monkeypatch, tmp_path):
    make_tokenizer, stops, pad = CASES[name]
    written, kept = WRITTEN[name]
    prompt = [special_id("<s>"), *ids("hi")]
    (reply,) = generate_batch(Scripted(written), [prompt], stop_ids=stops, pad_id=pad, max_new_tokens=len(written))
    assert reply == Reply(kept, True)


def test_harmony_tool_call_stops_at_call():
    _, stops, pad = CASES["harmony"]
    call = hand_ids('<|channel|>commentary json<|message|>{"city": "Oslo"}', chat_tokens=True)
    written = call + [chat_token_id("<|call|>")] + hand_ids("<|start|>functions", chat_tokens=True)
    (reply,) = generate_batch(Scripted(written), [ids("hi")], stop_ids=stops, pad_id=pad, max_new_tokens=len(written))
    assert reply == Reply(call, True)
