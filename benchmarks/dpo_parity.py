"""sftlab's DPO loss and gradients next to TRL's DPOTrainer, on the same pairs and weights.

Run (from the repository root, in a venv with TRL, see benchmarks/README.md):

    /work/benchvenv/bin/python benchmarks/dpo_parity.py            # tiny Llama, 8 pairs, every loss type
    /work/benchvenv/bin/python benchmarks/dpo_parity.py --pairs 32 --loss-types sigmoid

The same pairs rendered the same way: the pairs are token ids (prompt, chosen, rejected) made from
a seed; TRL gets them through its own collator (DataCollatorForPreference: [prompt + chosen] and
[prompt + rejected] as two padded rows) and computes its loss with DPOTrainer._compute_loss (its
reference model a frozen copy of the initial weights); sftlab gets them as Pairs, one shared row
[P | C | R] per pair, its reference log-probs computed once. Both start from the same weights.
The policy is the initial weights plus seeded noise, so the losses are not all log 2. Printed: each
loss, the largest absolute gradient difference over every weight next to the largest gradient, and
the verdict against the tolerance (default 1e-5, relative to max(1, the larger value)); the exit
code is 1 when any loss type differs. Measured: see docs/benchmarks.md ("DPO against TRL").
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from sftlab.data.container import Pairs  # noqa: E402
from sftlab.training.distributed import Processes  # noqa: E402
from sftlab.training.preference import PreferenceLoss, collate_pairs, reference_log_probs  # noqa: E402


def tiny_llama(vocab: int, seed: int):
    import transformers

    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).float()


def make_pairs(count: int, vocab: int, seed: int) -> Pairs:
    generator = torch.Generator().manual_seed(seed)

    def ids(low, high):
        n = int(torch.randint(low, high, (1,), generator=generator))
        return torch.randint(3, vocab, (n,), generator=generator).tolist()

    return Pairs.from_lists([(ids(3, 12), ids(1, 9), ids(1, 9)) for _ in range(count)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--loss-types", default="sigmoid,ipo,hinge,robust")
    parser.add_argument("--tolerance", type=float, default=1e-5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import datasets

    datasets.disable_progress_bars()  # TRL maps its one-row placeholder dataset each time: no bars for it
    pairs = make_pairs(args.pairs, args.vocab, args.seed)
    failures = 0
    for loss_type in args.loss_types.split(","):
        # robust needs label smoothing; plain sigmoid in TRL has none (conservative DPO is sftlab's sigmoid with it)
        smoothing = 0.1 if loss_type == "robust" else 0.0
        # A trained policy differs from its reference: one step of noise so the losses are not all log 2.
        base = tiny_llama(args.vocab, args.seed)
        reference_model = copy.deepcopy(base)
        with torch.no_grad():
            for param in base.parameters():
                param.add_(torch.randn_like(param) * 0.02)
        ours_model, theirs_model = copy.deepcopy(base), copy.deepcopy(base)
        ours, our_grads = sftlab_loss_and_grads_with_reference(ours_model, reference_model, pairs, loss_type, args.beta, smoothing)
        theirs, their_grads = trl_loss_and_grads_with_reference(theirs_model, reference_model, pairs, loss_type, args.beta,
                                                                smoothing)
        largest = max(float(g.abs().max()) for g in their_grads.values())
        difference = max(float((our_grads[n] - their_grads[n]).abs().max()) for n in their_grads)
        ok = abs(ours - theirs) <= args.tolerance * max(1.0, abs(theirs)) and difference <= args.tolerance * max(1.0, largest)
        failures += not ok
        print(f"{loss_type:8s} loss sftlab {ours:.8f}  TRL {theirs:.8f}  |diff| {abs(ours - theirs):.2e}   "
              f"max |grad diff| {difference:.2e} (largest grad {largest:.2e})   {'OK' if ok else 'DIFFERENT'}")
    return 1 if failures else 0


def sftlab_loss_and_grads_with_reference(model, reference_model, pairs, loss_type, beta, smoothing):
    reference = reference_log_probs(reference_model, pairs, 0, Processes())
    batch = collate_pairs(pairs, list(range(len(pairs))), 0)
    tensors = {k: v for k, v in batch.items() if torch.is_tensor(v)}
    tensors["ref_chosen"] = torch.from_numpy(reference[:, 0]).float()
    tensors["ref_rejected"] = torch.from_numpy(reference[:, 1]).float()
    module = PreferenceLoss(model, loss_type, beta=beta, label_smoothing=smoothing)
    model.train()
    model.zero_grad()
    out = module(**tensors)
    loss = out["loss_sum"] / out["pairs"]
    loss.backward()
    return float(loss), {name: p.grad.clone() for name, p in model.named_parameters()}


def trl_loss_and_grads_with_reference(model, reference_model, pairs, loss_type, beta, smoothing):
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    vocab = {f"t{i}": i for i in range(model.config.vocab_size)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")),
                                        pad_token="t0", eos_token="t2", unk_token="t1")
    args = DPOConfig(output_dir="/tmp/sftlab-dpo-parity", use_cpu=True, bf16=False, beta=beta, loss_type=[loss_type],
                     label_smoothing=smoothing, report_to=[], per_device_train_batch_size=len(pairs))
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(reference_model), args=args,
                         train_dataset=Dataset.from_list([{"prompt": "t3", "chosen": "t4", "rejected": "t5"}]),
                         processing_class=tokenizer)
    collator = DataCollatorForPreference(pad_token_id=0)
    batch = collator([{"prompt_ids": p.tolist(), "chosen_ids": c.tolist(), "rejected_ids": r.tolist()}
                      for p, c, r in (pairs[i] for i in range(len(pairs)))])
    trainer.model.train()
    model.zero_grad()
    loss = trainer._compute_loss(trainer.model, batch, return_outputs=False)
    loss.backward()
    return float(loss), {name: p.grad.clone() for name, p in model.named_parameters()}


if __name__ == "__main__":
    sys.exit(main())
