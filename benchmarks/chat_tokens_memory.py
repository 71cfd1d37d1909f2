"""What training the new tokens' rows costs under LoRA (add_chat_tokens): PEFT's trainable tokens (only the
new rows train; what sftlab does) against the embedding and head as modules_to_save (the whole matrices
train, and PEFT keeps a trained copy beside the frozen original).

The model has Gemma-3-270M's vocabulary and width (262144 + 2 rows of 640, tied head; or --untied) and two
decoder layers: the embedding is what differs between the two ways, the layers are the same in both. For
each way, after one AdamW step on a short batch: the trained parameters, the bytes of their gradients and
AdamW state, the extra weights PEFT holds (copies), and the adapter file that final/ would hold.

    /work/main/.venv/bin/python benchmarks/chat_tokens_memory.py [--untied]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

VOCAB, HIDDEN, NEW = 262144, 640, 2


def build(tie: bool):
    import transformers

    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2048,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                                      tie_word_embeddings=tie)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def measure(way: str, tie: bool) -> dict:
    from peft import LoraConfig, get_peft_model

    from sftlab.data.chat_tokens import AddedChatTokens
    from sftlab.training.setup import add_token_rows, new_token_layers

    model = build(tie)
    ids = list(range(VOCAB, VOCAB + NEW))
    add_token_rows(model, AddedChatTokens(tokens=["<|a|>", "<|b|>"], ids=ids, vocab_size=VOCAB + NEW))
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    lora = dict(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    if way == "trainable_tokens":
        lora["trainable_token_indices"] = new_token_layers(model, ids, None)
    else:
        lora["modules_to_save"] = ["embed_tokens"] + ([] if tie else ["lm_head"])
    model = get_peft_model(model, LoraConfig(**lora))
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-4)
    batch = torch.randint(0, VOCAB + NEW, (2, 64))
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in trained if p.grad is not None)
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if torch.is_tensor(t))
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, save_embedding_layers=False)
        adapter = os.path.getsize(os.path.join(folder, "adapter_model.safetensors"))
    return {"way": way, "trained parameters": sum(p.numel() for p in trained), "gradients MB": grads / 2**20,
            "AdamW state MB": state / 2**20, "extra weights MB": (weights - base_bytes) / 2**20,
            "adapter file MB": adapter / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--untied", action="store_true", help="an untied head (its new rows train too)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [measure(way, not args.untied) for way in ("trainable_tokens", "modules_to_save")]
    head = "untied" if args.untied else "tied"
    print(f"vocabulary {VOCAB} + {NEW}, hidden {HIDDEN}, {head} head, LoRA r 16 all-linear")
    for row in rows:
        print("  " + ", ".join(f"{k}: {v:.1f}" if isinstance(v, float) else f"{k}: {v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
